// node-postgres (named prepared queries) and postgres.js (prepares every
// query by default): the driver matrix workload (see drivers.rs).
// node node_wl.mjs NPM_DIR HOST PORT USER DB CONNECTIONS ITERATIONS
// Prints one JSON object: per-connection results and the errors seen.
import { createRequire } from 'module';
import { pathToFileURL } from 'url';
const [npmDir, host, port, user, db, nStr, kStr] = process.argv.slice(2);
const require = createRequire(npmDir + '/package.json');
const pg = require('pg');
// postgres.js 3 is CommonJS, 4 an ES module only (Node 20's require() of it
// gives the namespace, not the function): import() takes either.
const postgres = (await import(pathToFileURL(require.resolve('postgres')).href)).default;
const n = Number(nStr), k = Number(kStr);
const results = {}, errors = [];

async function nodePg(c) {
  const out = results[`pg${c}`] = [];
  const client = new pg.Client({ host, port: Number(port), user, database: db });
  await client.connect();
  try {
    await client.query(`SET search_path = s${c}, public`);
    for (let i = 0; i < k; i++) {
      const q = async (name, text, values = []) => (await client.query({ name, text, values })).rows;
      out.push(await q('double', 'SELECT $1::int * 2 AS d', [i]));
      await client.query('BEGIN');
      await client.query('CREATE TEMP TABLE t_commit(a int) ON COMMIT DROP');
      for (let j = 0; j <= i; j++) await q('ins_commit', 'INSERT INTO t_commit VALUES ($1)', [j]);
      out.push(await q('count_commit', 'SELECT count(*)::int AS n FROM t_commit WHERE a >= $1', [0]));
      await client.query('COMMIT');
      await client.query('BEGIN');
      await client.query('CREATE TEMP TABLE t_del(a int) ON COMMIT DELETE ROWS');
      await q('ins_del', 'INSERT INTO t_del SELECT generate_series(1, $1::int)', [i + 1]);
      out.push(await q('sum_del', 'SELECT sum(a)::int AS s FROM t_del'));
      await client.query('COMMIT');
      out.push(await q('count_del', 'SELECT count(*)::int AS n FROM t_del'));
      await client.query('DROP TABLE t_del');
      await client.query('CREATE TABLE mid(a int, b text)');
      await q('ins_mid', 'INSERT INTO mid VALUES ($1, $2)', [i, `m${i}`]);
      out.push(await q('sel_mid', 'SELECT a, b FROM mid'));
      await client.query('DROP TABLE mid');
      await client.query(`ALTER TABLE items ADD COLUMN x${i} int DEFAULT ${i}`);
      out.push(await q('sel_items', 'SELECT id, v FROM items WHERE id >= $1 ORDER BY id', [0]));
      await client.query('SET search_path = public');
      out.push(await q('schemas', 'SELECT current_schemas(false)::text AS s'));
      await client.query(`SET search_path = s${c}, public`);
    }
  } catch (e) {
    errors.push(`pg${c}: ${e.code || ''} ${e.message}`);
  } finally {
    await client.end();
  }
}

async function postgresJs(c) {
  const out = results[`postgresjs${c}`] = [];
  const sql = postgres({ host, port: Number(port), user, database: db, max: 1,
    connection: { search_path: `s${c}, public` } });
  try {
    for (let i = 0; i < k; i++) {
      out.push((await sql`SELECT ${i}::int * 2 AS d`).map(r => ({ ...r })));
      await sql.begin(async tx => {
        await tx`CREATE TEMP TABLE t_commit(a int) ON COMMIT DROP`;
        for (let j = 0; j <= i; j++) await tx`INSERT INTO t_commit VALUES (${j})`;
        out.push((await tx`SELECT count(*)::int AS n FROM t_commit WHERE a >= ${0}`).map(r => ({ ...r })));
      });
      await sql`CREATE TABLE mid(a int, b text)`;
      await sql`INSERT INTO mid VALUES (${i}, ${'m' + i})`;
      out.push((await sql`SELECT a, b FROM mid`).map(r => ({ ...r })));
      await sql`DROP TABLE mid`;
      await sql.unsafe(`ALTER TABLE items ADD COLUMN y${i} int DEFAULT ${i}`);
      out.push((await sql`SELECT id, v FROM items WHERE id >= ${0} ORDER BY id`).map(r => ({ ...r })));
      await sql.begin(async tx => {
        await tx`CREATE TEMP TABLE t_kept(a int)`;
        await tx`INSERT INTO t_kept VALUES (${i})`;
      });
      out.push((await sql`SELECT a FROM t_kept`).map(r => ({ ...r })));
      await sql`DROP TABLE t_kept`;
    }
  } catch (e) {
    errors.push(`postgresjs${c}: ${e.code || ''} ${e.message}`);
  } finally {
    await sql.end();
  }
}

const tasks = [];
for (let c = 0; c < n; c++) tasks.push(nodePg(c));
await Promise.all(tasks);
const tasks2 = [];
for (let c = 0; c < n; c++) tasks2.push(postgresJs(c));
await Promise.all(tasks2);
const sorted = Object.fromEntries(Object.keys(results).sort().map(key => [key, results[key]]));
console.log(JSON.stringify({ results: sorted, errors }));
