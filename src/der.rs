//! A minimal DER reader: TLVs with low tag numbers and definite lengths, and
//! the walk into an X.509 certificate's tbsCertificate. Enough for the two
//! places that read certificates themselves: the expiry metric (validity)
//! and JWT keys given as certificates (SubjectPublicKeyInfo); rustls and
//! webpki do the real verification.

/// The DER tag of a SEQUENCE.
pub const SEQUENCE: u8 = 0x30;

/// One DER TLV: (tag, contents, rest). Low tag numbers and definite lengths only.
pub fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, input) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, mut input) = input.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || input.len() < n {
            return None;
        }
        let (bytes, rest) = input.split_at(n);
        input = rest;
        bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
    };
    if input.len() < len {
        return None;
    }
    let (contents, rest) = input.split_at(len);
    Some((tag, contents, rest))
}

/// One field of a tbsCertificate: its tag, its contents and its whole
/// encoding (tag and length included).
#[derive(Debug, Clone, Copy)]
pub struct Field<'a> {
    /// The DER tag.
    pub tag: u8,
    /// The contents.
    pub contents: &'a [u8],
    /// The whole TLV.
    pub whole: &'a [u8],
}

/// The tbsCertificate fields of a DER X.509 certificate that follow the
/// optional `[0]` version: serialNumber, signature, issuer, validity,
/// subject, subjectPublicKeyInfo. `None` for anything malformed.
pub fn tbs_fields(cert: &[u8]) -> Option<[Field<'_>; 6]> {
    let (tag, cert, _) = tlv(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = tlv(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut rest = tbs;
    if let Some((0xA0, _, after)) = tlv(rest) {
        rest = after; // [0] EXPLICIT version
    }
    let mut next = || {
        let (tag, contents, after) = tlv(rest)?;
        let whole = &rest[..rest.len() - after.len()];
        rest = after;
        Some(Field {
            tag,
            contents,
            whole,
        })
    };
    Some([next()?, next()?, next()?, next()?, next()?, next()?])
}
