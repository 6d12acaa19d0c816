-- Views over the set-returning functions, readable by pg_monitor (and
-- superusers), like the server's own statistics views.
CREATE VIEW nextgres.pools AS SELECT * FROM nextgres.pools_fn();
CREATE VIEW nextgres.clients AS SELECT * FROM nextgres.clients_fn();
CREATE VIEW nextgres.backends AS SELECT * FROM nextgres.backends_fn();
CREATE VIEW nextgres.pauses AS SELECT * FROM nextgres.pauses_fn();

REVOKE ALL ON FUNCTION nextgres.pools_fn(), nextgres.clients_fn(), nextgres.backends_fn(), nextgres.pauses_fn(), nextgres.status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nextgres.pools_fn(), nextgres.clients_fn(), nextgres.backends_fn(), nextgres.pauses_fn(), nextgres.status() TO pg_monitor;
REVOKE ALL ON nextgres.pools, nextgres.clients, nextgres.backends, nextgres.pauses FROM PUBLIC;
GRANT SELECT ON nextgres.pools, nextgres.clients, nextgres.backends, nextgres.pauses TO pg_monitor;
GRANT USAGE ON SCHEMA nextgres TO pg_monitor;

-- Operations: superusers only unless granted (see README, Operations).
REVOKE ALL ON FUNCTION nextgres.pause(text, text, integer), nextgres.resume(text, text), nextgres.reconnect(text, text), nextgres.reset_stats(text, text), nextgres.kill_clients(text, text), nextgres.kill_client(text, integer), nextgres.wait_close(text, text, integer) FROM PUBLIC;
