-- Bulk fill of Herald's SQLite inbox for the list/count benchmark at scale (docs/BENCHMARKS.md,
-- "Notification inbox", 3): the rows only. Run by scripts/inbox-bulk-fill.sh (which checks the table's
-- columns first and runs this in chunks), never by Herald.
--
-- THE ONE PLACE the benchmark knows the inbox schema (src/inbox/sqlite.rs, SCHEMA): the items columns and
-- what they mean. A change of the items table needs a change here (inbox-bulk-fill.sh stops when the
-- columns differ from the COLUMNS line below). The counts are deliberately not written: Herald's start-up recount rebuilds them, and
-- that recount's time at this scale is one of the numbers measured.
--
-- COLUMNS id,user,category,title,body,avatar,action_url,actions,data,created_ms,expires_ms,read_ms,seen_ms,archived_ms,snoozed_until,action,idem_key
--
-- Herald's indexes stay on: ids rise, so the created, expiry and snooze indexes only append, and the
-- (user, id) and (user, idempotency key) ones append at each user's end (keys rise with the id).
--
-- Parameters: @users, @items (items per inbox: the newest have the states of new items), @from, @to (the
-- item levels this chunk writes), @now (ms), @mode: 'generate' computes every column, 'copy' copies the
-- rows of levels 0 .. @to-@from-1 of the template (the table `items` of a file attached as `tpl`, filled
-- by 'generate' run on that file) to levels @from .. @to-1 with their ids and times moved on. Copying
-- computes no strings (~2 us of CPU a row against ~7 us generated), and the old items it makes have the
-- sizes and the mix of states of generated old items; the newest are generated. The template is a file of
-- its own because a copy within one table makes SQLite materialize every row it reads first.
.bail on
PRAGMA journal_mode = OFF;
PRAGMA synchronous = OFF;
PRAGMA cache_size = -2097152;

-- Row i (0-based, id i+1) is item k = i / @users of user u = i % @users: item k of every inbox before
-- item k+1, as `inbox_notify` fan-outs write them (and as `herald-bench inbox read` places its deep cursor),
-- so one user's items are spread over the whole table, as in a real shared inbox file. Times: the oldest
-- item 60 days ago (inside the default 90-day inbox.max_age, so the sweeper deletes nothing), created_ms
-- rising with the id. Pseudo-random fields come from multiplicative hashes of i (h1..h4, 0..99).
-- Users: one in ten never reads (everything unread); the others read 97% of what is older than their 20
-- newest items and 30% of those 20; seen = read, or older than the 5 newest; 10% of read items archived;
-- 0.2% of unread ones snoozed for a week. Categories c0..c4 at 40/25/15/12/8%. 60% have an avatar, 80% an
-- action URL, 20% two actions (half of those read have one taken), 30% a data object, 25% an idempotency
-- key, 5% an expiry 30 days ahead.
INSERT INTO items (id, user, category, title, body, avatar, action_url, actions, data, created_ms,
                   expires_ms, read_ms, seen_ms, archived_ms, snoozed_until, action, idem_key)
SELECT * FROM (
WITH RECURSIVE n(i) AS (SELECT @from * @users UNION ALL SELECT i + 1 FROM n WHERE i + 1 < @to * @users),
r AS (
  SELECT i, i % @users AS u, @items - 1 - i / @users AS age,
         (i * 2654435761) % 4294967296 AS x,
         (i * 2246822519 + 7) % 4294967296 AS y
  FROM n
),
s AS (
  SELECT i, u, age, x, y,
         (x / 7) % 100 AS h1, (y / 11) % 100 AS h2, (x / 1031) % 100 AS h3, (y / 4099) % 100 AS h4,
         @now - 5184000000 + (i * 5184000000) / (@users * @items) AS created,
         CASE WHEN u % 10 = 0 THEN 0
              WHEN @items - 1 - i / @users >= 20 THEN ((y / 11) % 100) < 97
              ELSE ((y / 11) % 100) < 30 END AS is_read
  FROM r
)
SELECT
  i + 1,
  'u' || u,
  CASE WHEN h1 < 40 THEN 'c0' WHEN h1 < 65 THEN 'c1' WHEN h1 < 80 THEN 'c2' WHEN h1 < 92 THEN 'c3' ELSE 'c4' END,
  CASE h1 % 4
    WHEN 0 THEN 'New comment on "Quarterly planning ' || (x % 9000 + 1000) || '"'
    WHEN 1 THEN 'User ' || (y % 100000) || ' mentioned you in #project-' || (x % 500)
    WHEN 2 THEN 'Build ' || (x % 100000) || ' finished on branch feature/' || (y % 3000)
    ELSE 'Invitation: review request ' || (x % 10000) || ' is waiting for you' END,
  'User ' || (y % 100000) || ' wrote: "Thanks, that works for me. Can we move the review of item '
    || (x % 10000) || ' to Thursday and keep the rest of the plan as it is?"',
  CASE WHEN h2 < 60 THEN 'https://cdn.example.com/avatars/' || (y % 100000) || '.png' END,
  CASE WHEN h3 < 80 THEN 'https://app.example.com/projects/' || (x % 500) || '/items/' || i END,
  CASE WHEN h4 < 20 THEN '[{"id":"accept","label":"Accept"},{"id":"decline","label":"Decline","url":"https://app.example.com/invites/' || i || '/decline"}]'
       ELSE '[]' END,
  CASE WHEN h3 % 10 < 3 THEN '{"project":' || (x % 500) || ',"thread":' || (y % 1000000) || ',"actor":{"id":"u' || (y % 100000) || '","name":"User ' || (y % 100000) || '"}}' END,
  created,
  CASE WHEN h2 % 20 = 0 THEN @now + 2592000000 END,
  CASE WHEN is_read THEN min(created + (x % 86400000), @now) END,
  CASE WHEN is_read OR age >= 5 THEN min(created + (x % 43200000), @now) END,
  CASE WHEN is_read AND h4 % 10 = 1 THEN min(created + (y % 172800000), @now) END,
  CASE WHEN NOT is_read AND h3 % 50 = 7 THEN @now + 604800000 END,
  CASE WHEN is_read AND h4 < 10 THEN 'accept' END,
  CASE WHEN h2 % 4 = 1 THEN printf('evt-%012d', i + 1) END
FROM s) WHERE @mode = 'generate';


-- Copy: level L of user u gets the columns of level L - @from of u; times move by the levels' distance
-- (read, seen and archived times stay at most @now); idempotency keys stay unique per user.
INSERT INTO items (id, user, category, title, body, avatar, action_url, actions, data, created_ms,
                   expires_ms, read_ms, seen_ms, archived_ms, snoozed_until, action, idem_key)
SELECT id + @from * @users, user, category, title, body, avatar, action_url, actions, data,
       created_ms + (@from * 5184000000) / @items, expires_ms,
       min(read_ms + (@from * 5184000000) / @items, @now),
       min(seen_ms + (@from * 5184000000) / @items, @now),
       min(archived_ms + (@from * 5184000000) / @items, @now),
       snoozed_until, action, CASE WHEN idem_key IS NOT NULL THEN printf('evt-%012d', id + @from * @users) END
FROM tpl.items WHERE @mode = 'copy' AND id <= (@to - @from) * @users;
