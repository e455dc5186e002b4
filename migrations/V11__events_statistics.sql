-- No query filters or joins on the events table's opaque columns: the payload and
-- metadata (jsonb, with ciphertext for personal fields) and the hash chain (bytea).
-- Statistics on them only cost ANALYZE: detoasting and comparing ~30,000 sampled
-- jsonb values was about 60 % of an automatic ANALYZE of `events` (575 -> 227 ms on
-- 185k rows), and an automatic ANALYZE runs every 10 % of growth, while the service
-- appends (docs/benchmarks.md, issue 12). The planner keeps its statistics on the
-- columns queries do use (organisation, stream, commit order, time).
ALTER TABLE events
    ALTER COLUMN payload SET STATISTICS 0,
    ALTER COLUMN metadata SET STATISTICS 0,
    ALTER COLUMN hash SET STATISTICS 0,
    ALTER COLUMN prev_hash SET STATISTICS 0;
