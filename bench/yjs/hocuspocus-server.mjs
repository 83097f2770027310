// @hocuspocus/server for the benchmark, with its SQLite persistence (@hocuspocus/extension-sqlite):
//   node22 hocuspocus-server.mjs PORT DATABASE_FILE
// Defaults otherwise: the document is stored as a whole (one row per document, its full state) 2 s after an
// edit (debounce), at most 10 s after the first unstored one (maxDebounce), and when its last client leaves.
import { Server } from '@hocuspocus/server';
import { SQLite } from '@hocuspocus/extension-sqlite';

const [port, database] = process.argv.slice(2);
const server = new Server({
  port: Number(port),
  address: '127.0.0.1',
  quiet: true,
  extensions: [new SQLite({ database })],
});
await server.listen();
console.log(`hocuspocus listening on 127.0.0.1:${port}`);
