//! The Lua scripts of the inbox on Redis. A script runs atomically, so what one does is seen whole or not at
//! all by every node: a change's items, its counts, the inbox's version and its event commit together.
//!
//! Every script takes the key prefix as `ARGV[1]` (`P` below, `<engine.prefix>:inbox` unless configured)
//! and builds its keys from it, so, like the engine, the store targets one Redis server (or a primary
//! with replicas), not a sharded Redis Cluster. Numbers go through `string.format('%d', n)`: Lua's
//! default formatting switches to exponents past 14 digits.
//!
//! Layout:
//! - `P:epoch`: this inbox's incarnation, part of every event id (a Redis that lost its data starts a new
//!   one, so no event id the log may still hold is reused).
//! - `P:id`: the item id counter (one sequence for every user, as SQLite's AUTOINCREMENT).
//! - `P:i:<id>`: an item, a hash: `u` owner, `c` category, `d` its content as JSON (title, body, avatar,
//!   action_url, actions, data), `t` created, `e` expires, `r` read, `s` seen, `a` archived, `z` snoozed
//!   until, `x` action taken, `k` idempotency key (absent fields are `None`).
//! - `P:z:<user>`: the user's item ids, a sorted set scored by id (lists walk it newest first).
//! - `P:n:<user>`: the user's counts, a hash with `t:<category>`, `r:<category>` (unread),
//!   `s:<category>` (unseen), `a:<category>` (archived); a category whose total reaches 0 is removed.
//! - `P:u:<user>`: the inbox, a hash: `v` version, `p` preferences (JSON).
//! - `P:k:<user>`: idempotency key -> item id.
//! - `P:users`: every user with an inbox, a sorted set with score 0 (read in byte order for audiences).
//! - `P:snoozed`, `P:expires`, `P:created`: item ids scored by snooze end, expiry and creation time
//!   (the sweeper reads what is due).
//! - `P:oseq`: the event counter; `P:outbox`: a stream of committed events, entry id `<oseq>-0`, fields
//!   `u` user, `i` event id, `p` payload; `P:drained`: the highest event position published.
//! - `P:drain`: the lease of the node that publishes the outbox; `P:sweep`: the sweeper's lease.
//! - `P:wake`: a pub/sub channel; a commit that made events and a drained batch announce themselves.

/// Helpers shared by the scripts.
const PRELUDE: &str = r#"
local P = ARGV[1]
local function fmt(n) return string.format('%d', n) end
local function item(id)
  local f = redis.call('HGETALL', P .. ':i:' .. id)
  table.insert(f, 1, id)
  return f
end
local function tally_json(x)
  return '{"total":' .. fmt(x.t) .. ',"unread":' .. fmt(x.r) .. ',"unseen":' .. fmt(x.s) ..
    ',"archived":' .. fmt(x.a) .. '}'
end
local function counts_json(u)
  local h = redis.call('HGETALL', P .. ':n:' .. u)
  local cats, names = {}, {}
  for i = 1, #h, 2 do
    local kind, c = string.sub(h[i], 1, 1), string.sub(h[i], 3)
    if not cats[c] then
      cats[c] = {t = 0, r = 0, s = 0, a = 0}
      names[#names + 1] = c
    end
    cats[c][kind] = tonumber(h[i + 1])
  end
  table.sort(names)
  local all = {t = 0, r = 0, s = 0, a = 0}
  local parts = {}
  for _, c in ipairs(names) do
    local x = cats[c]
    all.t = all.t + x.t
    all.r = all.r + x.r
    all.s = all.s + x.s
    all.a = all.a + x.a
    parts[#parts + 1] = cjson.encode(c) .. ':' .. tally_json(x)
  end
  return '{"total":' .. fmt(all.t) .. ',"unread":' .. fmt(all.r) .. ',"unseen":' .. fmt(all.s) ..
    ',"archived":' .. fmt(all.a) .. ',"categories":{' .. table.concat(parts, ',') .. '}}'
end
"#;

/// What a notify needs to decide, for each user, in one snapshot; reserves one item id per user.
/// ARGV: prefix, max_items, idempotency key ('' = none), users. Returns {first reserved id, then per user
/// {version, preferences ('' = none), id of the item with the key ('' = none), {the oldest items that
/// one more would push over max_items}}}.
const SNAP_NOTIFY: &str = r#"
local max = tonumber(ARGV[2])
local key = ARGV[3]
local n = #ARGV - 3
local last = redis.call('INCRBY', P .. ':id', n)
local out = {fmt(last - n + 1)}
for i = 4, #ARGV do
  local u = ARGV[i]
  local h = redis.call('HMGET', P .. ':u:' .. u, 'v', 'p')
  local dup = false
  if key ~= '' then dup = redis.call('HGET', P .. ':k:' .. u, key) end
  local old = {}
  local over = redis.call('ZCARD', P .. ':z:' .. u) + 1 - max
  if over > 0 and not dup then
    for _, id in ipairs(redis.call('ZRANGE', P .. ':z:' .. u, 0, over - 1)) do
      old[#old + 1] = item(id)
    end
  end
  out[#out + 1] = {h[1] or '0', h[2] or '', dup or '', old}
end
return out
"#;

/// The items a change targets, with the inbox's version and counts, in one snapshot.
/// ARGV: prefix, user, mode, then for mode `i` the ids, for mode `u` the highest id and a category
/// ('' = any). Returns {version, counts hash, items as {id, field, value, ...}}; an id that is not the
/// user's comes back as {id} alone.
const SNAP_TARGET: &str = r#"
local u = ARGV[2]
local out = {redis.call('HGET', P .. ':u:' .. u, 'v') or '0', redis.call('HGETALL', P .. ':n:' .. u)}
if ARGV[3] == 'i' then
  for i = 4, #ARGV do
    if redis.call('HGET', P .. ':i:' .. ARGV[i], 'u') == u then
      out[#out + 1] = item(ARGV[i])
    else
      out[#out + 1] = {ARGV[i]}
    end
  end
else
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. ':z:' .. u, '-inf', ARGV[4])) do
    local f = redis.call('HMGET', P .. ':i:' .. id, 'c')
    if f[1] and (ARGV[5] == '' or f[1] == ARGV[5]) then out[#out + 1] = item(id) end
  end
end
return out
"#;

/// An inbox's version, preferences and counts. ARGV: prefix, user. Returns {version, preferences ('' =
/// none), counts hash}.
const INBOX: &str = r#"
local u = ARGV[2]
local h = redis.call('HMGET', P .. ':u:' .. u, 'v', 'p')
return {h[1] or '0', h[2] or '', redis.call('HGETALL', P .. ':n:' .. u)}
"#;

/// A page, newest first, with the counts and version of the same instant. ARGV: prefix, user, cursor
/// ('' = from the newest), limit, status (`a` all, `u` unread, `r` read, `n` unseen), archived (`f`
/// not archived, `t` archived, `a` both), category ('' = any), snoozed (`1` included). Returns {version,
/// counts hash, items (limit + 1 at most, so the caller knows whether a next page exists)}.
const LIST: &str = r#"
local u = ARGV[2]
local z = P .. ':z:' .. u
local limit = tonumber(ARGV[4])
local hi = '+inf'
if ARGV[3] ~= '' then hi = '(' .. ARGV[3] end
local st, ar, cat, sn = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local picked = {}
for _ = 1, 100000 do
  local ids = redis.call('ZREVRANGEBYSCORE', z, hi, '-inf', 'LIMIT', 0, 256)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    local f = redis.call('HMGET', P .. ':i:' .. id, 'c', 'r', 's', 'a', 'z')
    local ok = f[1] ~= false
    if ok and st == 'u' then ok = not f[2] elseif ok and st == 'r' then ok = f[2] ~= false
    elseif ok and st == 'n' then ok = not f[3] end
    if ok and ar == 'f' then ok = not f[4] elseif ok and ar == 't' then ok = f[4] ~= false end
    if ok and sn ~= '1' then ok = not f[5] end
    if ok and cat ~= '' then ok = f[1] == cat end
    if ok then
      picked[#picked + 1] = id
      if #picked > limit then break end
    end
  end
  if #picked > limit then break end
  hi = '(' .. ids[#ids]
end
local out = {redis.call('HGET', P .. ':u:' .. u, 'v') or '0', redis.call('HGETALL', P .. ':n:' .. u)}
for _, id in ipairs(picked) do out[#out + 1] = item(id) end
return out
"#;

/// Commits a change computed from a snapshot, if no inbox it read has changed since.
/// ARGV: prefix, number of checks N, N pairs (user, version read), the user whose counts to return ('' =
/// none), then operations, each an opcode and its arguments:
/// - `I id user category content created expires key`: a new item ('' = no expiry, no key);
/// - `S id read seen archived snoozed action`: an item's states ('' = none);
/// - `D user id`: removes an item;
/// - `C user category total unread unseen archived`: adds to a category's counts;
/// - `V user version`: sets the inbox's version;
/// - `F user preferences`: sets the inbox's preferences;
/// - `E user event_id payload`: appends an event; `payload` is a JSON object without its closing brace,
///   to which the user's counts, as they are now, are added.
///
/// Fails with HERALD_CONFLICT (before any write) when a version differs. Returns {the last event's
/// position (0: none), counts hash of the named user}.
const COMMIT: &str = r#"
local n = tonumber(ARGV[2])
for i = 0, n - 1 do
  local u, v = ARGV[3 + 2 * i], ARGV[4 + 2 * i]
  if (redis.call('HGET', P .. ':u:' .. u, 'v') or '0') ~= v then
    return redis.error_reply('HERALD_CONFLICT the inbox of ' .. u .. ' changed')
  end
end
local ret = ARGV[3 + 2 * n]
local i = 4 + 2 * n
local last = 0
while i <= #ARGV do
  local op = ARGV[i]
  if op == 'I' then
    local id, u = ARGV[i + 1], ARGV[i + 2]
    local k = P .. ':i:' .. id
    redis.call('HSET', k, 'u', u, 'c', ARGV[i + 3], 'd', ARGV[i + 4], 't', ARGV[i + 5])
    redis.call('ZADD', P .. ':z:' .. u, id, id)
    redis.call('ZADD', P .. ':created', ARGV[i + 5], id)
    if ARGV[i + 6] ~= '' then
      redis.call('HSET', k, 'e', ARGV[i + 6])
      redis.call('ZADD', P .. ':expires', ARGV[i + 6], id)
    end
    if ARGV[i + 7] ~= '' then
      redis.call('HSET', k, 'k', ARGV[i + 7])
      redis.call('HSET', P .. ':k:' .. u, ARGV[i + 7], id)
    end
    i = i + 8
  elseif op == 'S' then
    local id = ARGV[i + 1]
    local k = P .. ':i:' .. id
    local names = {'r', 's', 'a', 'z', 'x'}
    for j = 1, 5 do
      local v = ARGV[i + 1 + j]
      if v == '' then redis.call('HDEL', k, names[j]) else redis.call('HSET', k, names[j], v) end
    end
    if ARGV[i + 5] == '' then
      redis.call('ZREM', P .. ':snoozed', id)
    else
      redis.call('ZADD', P .. ':snoozed', ARGV[i + 5], id)
    end
    i = i + 7
  elseif op == 'D' then
    local u, id = ARGV[i + 1], ARGV[i + 2]
    local k = P .. ':i:' .. id
    local key = redis.call('HGET', k, 'k')
    if key and redis.call('HGET', P .. ':k:' .. u, key) == id then
      redis.call('HDEL', P .. ':k:' .. u, key)
    end
    redis.call('DEL', k)
    redis.call('ZREM', P .. ':z:' .. u, id)
    redis.call('ZREM', P .. ':created', id)
    redis.call('ZREM', P .. ':expires', id)
    redis.call('ZREM', P .. ':snoozed', id)
    i = i + 3
  elseif op == 'C' then
    local k, c = P .. ':n:' .. ARGV[i + 1], ARGV[i + 2]
    local t = redis.call('HINCRBY', k, 't:' .. c, ARGV[i + 3])
    redis.call('HINCRBY', k, 'r:' .. c, ARGV[i + 4])
    redis.call('HINCRBY', k, 's:' .. c, ARGV[i + 5])
    redis.call('HINCRBY', k, 'a:' .. c, ARGV[i + 6])
    if t == 0 then redis.call('HDEL', k, 't:' .. c, 'r:' .. c, 's:' .. c, 'a:' .. c) end
    i = i + 7
  elseif op == 'V' then
    redis.call('HSET', P .. ':u:' .. ARGV[i + 1], 'v', ARGV[i + 2])
    redis.call('ZADD', P .. ':users', 0, ARGV[i + 1])
    i = i + 3
  elseif op == 'F' then
    redis.call('HSET', P .. ':u:' .. ARGV[i + 1], 'p', ARGV[i + 2])
    redis.call('ZADD', P .. ':users', 0, ARGV[i + 1])
    i = i + 3
  elseif op == 'E' then
    local u = ARGV[i + 1]
    last = redis.call('INCR', P .. ':oseq')
    local payload = ARGV[i + 3] .. ',"counts":' .. counts_json(u) .. '}'
    redis.call('XADD', P .. ':outbox', fmt(last) .. '-0', 'u', u, 'i', ARGV[i + 2], 'p', payload)
    i = i + 4
  else
    return redis.error_reply('HERALD_BUG unknown inbox operation ' .. tostring(op))
  end
end
if last > 0 then redis.call('PUBLISH', P .. ':wake', 'c') end
local counts = {}
if ret ~= '' then counts = redis.call('HGETALL', P .. ':n:' .. ret) end
return {last, counts}
"#;

/// Takes or renews the outbox lease and reads the oldest events. ARGV: prefix, node, lease ms, limit.
/// Returns {'held' or 'taken', events} for the lease holder ('taken': it was free, so whatever the
/// previous holder was doing is unknown); {'other', published position, last position} otherwise.
/// An empty outbox means everything committed was published: the published position moves up to it.
const DRAIN: &str = r#"
local h = redis.call('GET', P .. ':drain')
local state
if h == ARGV[2] then
  redis.call('PEXPIRE', P .. ':drain', ARGV[3])
  state = 'held'
elseif not h then
  redis.call('SET', P .. ':drain', ARGV[2], 'PX', ARGV[3])
  state = 'taken'
else
  local top = redis.call('GET', P .. ':oseq') or '0'
  local done = redis.call('GET', P .. ':drained') or '0'
  if redis.call('XLEN', P .. ':outbox') == 0 then done = top end
  return {'other', done, top}
end
local events = redis.call('XRANGE', P .. ':outbox', '-', '+', 'COUNT', ARGV[4])
if #events == 0 then
  local top = redis.call('GET', P .. ':oseq')
  if top then redis.call('SET', P .. ':drained', top) end
end
return {state, events}
"#;

/// Forgets published events up to a position and records it. ARGV: prefix, position.
const PUBLISHED: &str = r#"
local upto = tonumber(ARGV[2])
redis.call('XTRIM', P .. ':outbox', 'MINID', fmt(upto + 1) .. '-0')
local done = tonumber(redis.call('GET', P .. ':drained') or '0')
if upto > done then redis.call('SET', P .. ':drained', fmt(upto)) end
redis.call('PUBLISH', P .. ':wake', 'd')
return 0
"#;

/// Where publishing has got to. ARGV: prefix. Returns {published position, last position}.
const PROGRESS: &str = r#"
local top = redis.call('GET', P .. ':oseq') or '0'
local done = redis.call('GET', P .. ':drained') or '0'
if redis.call('XLEN', P .. ':outbox') == 0 then done = top end
return {done, top}
"#;

/// Items due, with their owners: snoozes over (mode `s`), or past their expiry or older than the cutoff
/// (mode `x`). ARGV: prefix, mode, now, cutoff, limit. Returns {id, user, ...}; index entries of items
/// that no longer exist are dropped.
const DUE: &str = r#"
local now, limit = ARGV[3], tonumber(ARGV[5])
local ids = {}
if ARGV[2] == 's' then
  ids = redis.call('ZRANGEBYSCORE', P .. ':snoozed', '-inf', now, 'LIMIT', 0, limit)
else
  local seen = {}
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. ':expires', '-inf', now, 'LIMIT', 0, limit)) do
    seen[id] = true
    ids[#ids + 1] = id
  end
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. ':created', '-inf', '(' .. ARGV[4], 'LIMIT', 0, limit)) do
    if not seen[id] then ids[#ids + 1] = id end
  end
end
local out = {}
for _, id in ipairs(ids) do
  local u = redis.call('HGET', P .. ':i:' .. id, 'u')
  if u then
    out[#out + 1] = id
    out[#out + 1] = u
  else
    redis.call('ZREM', P .. ':snoozed', id)
    redis.call('ZREM', P .. ':expires', id)
    redis.call('ZREM', P .. ':created', id)
  end
end
return out
"#;

/// Recounts one inbox from its items and compares with its stored counts; with ARGV[3] = '1', replaces
/// the counts that differ (and drops ids of items that no longer exist). ARGV: prefix, user, repair.
/// Returns {categories that differed, items}.
const RECOUNT: &str = r#"
local u = ARGV[2]
local z = P .. ':z:' .. u
local cats = {}
local n = 0
local stale = {}
for _, id in ipairs(redis.call('ZRANGE', z, 0, -1)) do
  local f = redis.call('HMGET', P .. ':i:' .. id, 'c', 'r', 's', 'a', 'z')
  if f[1] then
    n = n + 1
    local c = cats[f[1]]
    if not c then
      c = {t = 0, r = 0, s = 0, a = 0}
      cats[f[1]] = c
    end
    local active = (not f[4]) and (not f[5])
    c.t = c.t + 1
    if active and not f[2] then c.r = c.r + 1 end
    if active and not f[3] then c.s = c.s + 1 end
    if f[4] then c.a = c.a + 1 end
  else
    stale[#stale + 1] = id
  end
end
local k = P .. ':n:' .. u
local h = redis.call('HGETALL', k)
local stored = {}
for i = 1, #h, 2 do
  local kind, c = string.sub(h[i], 1, 1), string.sub(h[i], 3)
  if not stored[c] then stored[c] = {t = 0, r = 0, s = 0, a = 0} end
  stored[c][kind] = tonumber(h[i + 1])
end
local differ = 0
for c, x in pairs(cats) do
  local s = stored[c]
  if (not s) or s.t ~= x.t or s.r ~= x.r or s.s ~= x.s or s.a ~= x.a then differ = differ + 1 end
end
for c, _ in pairs(stored) do
  if not cats[c] then differ = differ + 1 end
end
if ARGV[3] == '1' then
  for _, id in ipairs(stale) do redis.call('ZREM', z, id) end
  if differ > 0 then
    redis.call('DEL', k)
    for c, x in pairs(cats) do
      redis.call('HSET', k, 't:' .. c, fmt(x.t), 'r:' .. c, fmt(x.r), 's:' .. c, fmt(x.s), 'a:' .. c, fmt(x.a))
    end
  end
end
return {differ, n}
"#;

/// The scripts, hashed once. `invoke_async` loads a script Redis does not have (after a restart).
pub(super) struct Scripts {
    pub snap_notify: ::redis::Script,
    pub snap_target: ::redis::Script,
    pub inbox: ::redis::Script,
    pub list: ::redis::Script,
    pub commit: ::redis::Script,
    pub drain: ::redis::Script,
    pub published: ::redis::Script,
    pub progress: ::redis::Script,
    pub due: ::redis::Script,
    pub recount: ::redis::Script,
}

impl Scripts {
    pub fn new() -> Scripts {
        let s = |body: &str| ::redis::Script::new(&format!("{PRELUDE}{body}"));
        Scripts {
            snap_notify: s(SNAP_NOTIFY),
            snap_target: s(SNAP_TARGET),
            inbox: s(INBOX),
            list: s(LIST),
            commit: s(COMMIT),
            drain: s(DRAIN),
            published: s(PUBLISHED),
            progress: s(PROGRESS),
            due: s(DUE),
            recount: s(RECOUNT),
        }
    }
}
