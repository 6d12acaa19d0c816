"""asyncpg (its pool and statement cache, default settings) and SQLAlchemy 2's
async ORM on top of it: the driver matrix workload (see drivers.rs).

python asyncpg_wl.py HOST PORT USER DB CONNECTIONS ITERATIONS
Prints one JSON object: per-connection results and the errors seen.
"""
import asyncio, json, sys
import asyncpg
from sqlalchemy import Integer, Text, select, func
from sqlalchemy.ext.asyncio import create_async_engine, AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

host, port, user, db, n, k = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
results = {}
errors = []


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    v: Mapped[str] = mapped_column(Text)


async def one(pool, c):
    out = results.setdefault(f"asyncpg{c}", [])
    async with pool.acquire() as conn:
        await conn.execute(f"SET search_path = s{c}, public")
        for i in range(k):
            try:
                out.append(await conn.fetchval("SELECT $1::int * 2", i))
                async with conn.transaction():
                    await conn.execute("CREATE TEMP TABLE t_commit(a int) ON COMMIT DROP")
                    await conn.executemany("INSERT INTO t_commit VALUES ($1)", [(j,) for j in range(i + 1)])
                    out.append(await conn.fetchval("SELECT count(*) FROM t_commit WHERE a >= $1", 0))
                async with conn.transaction():
                    await conn.execute("CREATE TEMP TABLE t_del(a int) ON COMMIT DELETE ROWS")
                    await conn.execute("INSERT INTO t_del SELECT generate_series(1, $1::int)", i + 1)
                    out.append(await conn.fetchval("SELECT sum(a) FROM t_del"))
                out.append(await conn.fetchval("SELECT count(*) FROM t_del"))
                await conn.execute("DROP TABLE t_del")
                await conn.execute("CREATE TEMP TABLE t_kept(a int)")
                await conn.execute("INSERT INTO t_kept VALUES ($1)", i)
                out.append(await conn.fetchval("SELECT a FROM t_kept"))
                await conn.execute("DROP TABLE t_kept")
                await conn.execute("CREATE TABLE mid(a int, b text)")
                await conn.execute("INSERT INTO mid VALUES ($1, $2)", i, f"m{i}")
                out.append([tuple(r) for r in await conn.fetch("SELECT * FROM mid")])
                await conn.execute("DROP TABLE mid")
                await conn.execute(f"ALTER TABLE items ADD COLUMN x{i} int DEFAULT {i}")
                out.append([tuple(r) for r in await conn.fetch("SELECT * FROM items ORDER BY id")])
                await conn.execute("SET search_path = public")
                out.append(await conn.fetchval("SELECT current_schemas(false)::text"))
                await conn.execute(f"SET search_path = s{c}, public")
            except Exception as e:
                errors.append(f"asyncpg{c} iteration {i}: {type(e).__name__}: {e}")


async def orm(c):
    out = results.setdefault(f"orm{c}", [])
    engine = create_async_engine(
        f"postgresql+asyncpg://{user}@{host}:{port}/{db}",
        connect_args={"server_settings": {"search_path": f"s{c}"}},
        pool_size=1, max_overflow=0)
    try:
        for i in range(k):
            async with AsyncSession(engine) as s:
                async with s.begin():
                    s.add(Item(id=1000 + i, v=f"orm{i}"))
                async with s.begin():
                    it = await s.get(Item, 1000 + i)
                    it.v = it.v + "!"
                cnt = await s.scalar(select(func.count()).select_from(Item).where(Item.v.like("orm%")))
                rows = (await s.execute(select(Item.id, Item.v).where(Item.id >= 1000).order_by(Item.id))).all()
                out.append([cnt, [tuple(r) for r in rows]])
    except Exception as e:
        errors.append(f"orm{c}: {type(e).__name__}: {e}")
    finally:
        await engine.dispose()


async def main():
    pool = await asyncpg.create_pool(host=host, port=port, user=user, database=db, min_size=n, max_size=n)
    try:
        await asyncio.gather(*(one(pool, c) for c in range(n)))
    finally:
        await pool.close()
    await asyncio.gather(*(orm(c) for c in range(n)))
    print(json.dumps({"results": results, "errors": errors}, sort_keys=True, default=str))


asyncio.run(main())
