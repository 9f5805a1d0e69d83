// Prints the minified size of the library, as stated in README.md:
// esbuild --minify (ESM, as shipped: no bundling needed, no dependencies),
// raw and gzip-compressed (level 9).
import { build } from 'esbuild';
import { gzipSync } from 'node:zlib';
import { fileURLToPath } from 'node:url';

const entry = fileURLToPath(new URL('../index.js', import.meta.url));
const out = await build({ entryPoints: [entry], bundle: true, minify: true, format: 'esm', write: false });
const code = out.outputFiles[0].contents;
const gz = gzipSync(code, { level: 9 }).length;
console.log(`index.js minified: ${code.length} bytes; gzip -9: ${gz} bytes`);
