//! The Lua scripts the Redis engine runs. A script runs atomically in Redis, so a record's position, its
//! storage, its channel's retention and its publication on the feed happen together or not at all (a
//! script that fails after `INCR` leaves a hole in the positions, which the feed skips).
//!
//! Every script takes the key prefix as `ARGV[1]` and builds its keys from it (`<prefix>:log`,
//! `<prefix>:c:<channel>`, ...): channel keys are only known inside the script (alternate topics of a
//! record being removed), so the engine targets one Redis server (or a primary with replicas), not a
//! sharded Redis Cluster. Positions go through `string.format('%d', n)`: Lua's default number formatting
//! switches to exponents past 14 digits.
//!
//! Layout (`P` is the prefix):
//! - `P:epoch`: the history's incarnation; `P:seq`: the position counter (`INCR`).
//! - `P:log`: a stream of every retained record, entry id `<seq>-0`, fields `i` (event id), `m` (metadata
//!   JSON), `d` (data), `a` (alternate topics as a JSON array, when there are any).
//! - `P:c:<channel>`: the channel's index, a stream with the same entry ids and one field `t` (publish time,
//!   ms), which count and age retention trim; `P:a:<topic>`: records having `topic` as an alternate.
//! - `P:ids`: publisher id -> newest seq (generated ids name their position and are not stored).
//! - `P:pruned`: channel -> highest seq removed from it; `P:pruned_max`: the highest over all channels
//!   (the feed tells a hole from a trimmed record with it).
//! - `P:channels`: the set of channels with history (the age-retention pass walks it).
//! - `P:feed`: the pub/sub channel every node listens to.
//! - `P:pz:<channel>` / `P:ph:<channel>`: presence, client -> expiry (sorted set) and client -> info (hash).

/// Shared helpers of the scripts that remove records.
const PRELUDE: &str = r#"
local P = ARGV[1]
local function seqof(sid) return string.match(sid, '^(%d+)') end
local function note_pruned(ch, top)
  if top <= 0 then return end
  local cur = tonumber(redis.call('HGET', P .. 'pruned', ch) or '0')
  if top > cur then redis.call('HSET', P .. 'pruned', ch, string.format('%d', top)) end
  local g = tonumber(redis.call('GET', P .. 'pruned_max') or '0')
  if top > g then redis.call('SET', P .. 'pruned_max', string.format('%d', top)) end
end
local function drop(ck, sid)
  local s = seqof(sid)
  local e = redis.call('XRANGE', P .. 'log', sid, sid)
  if e[1] then
    local f = e[1][2]
    local id, alts
    for i = 1, #f, 2 do
      if f[i] == 'i' then id = f[i + 1] elseif f[i] == 'a' then alts = f[i + 1] end
    end
    if id and string.sub(id, 1, 1) ~= '#' and redis.call('HGET', P .. 'ids', id) == s then
      redis.call('HDEL', P .. 'ids', id)
    end
    if alts then
      for _, t in ipairs(cjson.decode(alts)) do
        local ak = P .. 'a:' .. t
        redis.call('XDEL', ak, sid)
        if redis.call('XLEN', ak) == 0 then redis.call('DEL', ak) end
      end
    end
    redis.call('XDEL', P .. 'log', sid)
  end
  redis.call('XDEL', ck, sid)
  return tonumber(s)
end
local function forget_if_empty(ch, ck)
  if redis.call('XLEN', ck) == 0 then
    redis.call('DEL', ck)
    redis.call('SREM', P .. 'channels', ch)
  end
end
local function trim_count(ch, ck, max, cap)
  local over = redis.call('XLEN', ck) - max
  if over <= 0 then return 0 end
  if over > cap then over = cap end
  local top = 0
  for _, e in ipairs(redis.call('XRANGE', ck, '-', '+', 'COUNT', over)) do
    local s = drop(ck, e[1])
    if s > top then top = s end
  end
  note_pruned(ch, top)
  return over
end
"#;

/// Makes sure the history has an epoch and that the counter is not behind what this node saw.
/// ARGV: prefix, the epoch this node knows ('' at start), the highest seq it saw, a fresh epoch.
/// A missing epoch (a Redis that came back empty) or a counter behind this node (a Redis that came back
/// from an older copy) means history was lost: the fresh epoch replaces it. The counter is raised to what
/// this node saw either way, so a position is never given twice. Returns {epoch, counter}.
const INIT: &str = r#"
local P = ARGV[1]
local cur = redis.call('GET', P .. 'epoch')
local seq = tonumber(redis.call('GET', P .. 'seq') or '0')
local floor = tonumber(ARGV[3])
if (not cur) or (cur == ARGV[2] and seq < floor) then
  cur = ARGV[4]
  redis.call('SET', P .. 'epoch', cur)
end
if seq < floor then
  redis.call('SET', P .. 'seq', ARGV[3])
  seq = floor
end
return {cur, string.format('%d', seq)}
"#;

/// Appends one record. ARGV: prefix, expected epoch, channel, id ('' = generate), metadata, data, time,
/// max_count ('' = none), removal cap, alternates as JSON ('' = none), then the alternate topics.
/// Fails with HERALD_EPOCH (before any write) when the epoch is not the expected one. Returns {seq, id}.
const APPEND: &str = r#"
local cur = redis.call('GET', P .. 'epoch')
if cur ~= ARGV[2] then
  return redis.error_reply('HERALD_EPOCH the history epoch is now ' .. tostring(cur))
end
local s = string.format('%d', redis.call('INCR', P .. 'seq'))
local sid = s .. '-0'
local id = ARGV[4]
if id == '' then id = '#' .. cur .. '-' .. s end
local ch = ARGV[3]
local ck = P .. 'c:' .. ch
if ARGV[10] == '' then
  redis.call('XADD', P .. 'log', sid, 'i', id, 'm', ARGV[5], 'd', ARGV[6])
else
  redis.call('XADD', P .. 'log', sid, 'i', id, 'm', ARGV[5], 'd', ARGV[6], 'a', ARGV[10])
  for i = 11, #ARGV do redis.call('XADD', P .. 'a:' .. ARGV[i], sid, 't', ARGV[7]) end
end
redis.call('XADD', ck, sid, 't', ARGV[7])
if ARGV[4] ~= '' then redis.call('HSET', P .. 'ids', id, s) end
redis.call('SADD', P .. 'channels', ch)
if ARGV[8] ~= '' then
  trim_count(ch, ck, tonumber(ARGV[8]), tonumber(ARGV[9]))
  forget_if_empty(ch, ck)
end
redis.call('PUBLISH', P .. 'feed', 'P' .. s .. '\n' .. cur .. '\n' .. id .. '\n' .. ARGV[5] .. '\n' .. ARGV[6])
return {s, id}
"#;

/// One bounded retention step on a channel. ARGV: prefix, channel, max_count ('' = none), cutoff time in
/// ms ('' = no age limit), most records to remove. Returns how many it removed (the cap: call again).
const TRIM: &str = r#"
local ch = ARGV[2]
local ck = P .. 'c:' .. ch
local cap = tonumber(ARGV[5])
local removed = 0
if ARGV[3] ~= '' then removed = trim_count(ch, ck, tonumber(ARGV[3]), cap) end
if ARGV[4] ~= '' and removed < cap then
  local cutoff = tonumber(ARGV[4])
  local top = 0
  for _, e in ipairs(redis.call('XRANGE', ck, '-', '+', 'COUNT', cap - removed)) do
    if tonumber(e[2][2]) >= cutoff then break end
    local s = drop(ck, e[1])
    if s > top then top = s end
    removed = removed + 1
  end
  note_pruned(ch, top)
end
forget_if_empty(ch, ck)
return removed
"#;

/// Removes up to a cap of a channel's oldest records. ARGV: prefix, channel, cap. Returns {removed, left}.
const REMOVE: &str = r#"
local ch = ARGV[2]
local ck = P .. 'c:' .. ch
local top = 0
local n = 0
for _, e in ipairs(redis.call('XRANGE', ck, '-', '+', 'COUNT', tonumber(ARGV[3]))) do
  local s = drop(ck, e[1])
  if s > top then top = s end
  n = n + 1
end
note_pruned(ch, top)
forget_if_empty(ch, ck)
return {n, redis.call('XLEN', ck)}
"#;

/// Removes up to a cap of a channel's records with `seq <= upto` (a compacted document drops the updates
/// its snapshot holds). ARGV: prefix, channel, upto, cap. Returns {removed, more}: `more` is 1 when the
/// cap was reached (call again). The removed mark is raised in the same script, so a reader never sees the
/// records gone without it (a client resuming from before the cut is told it was not recovered).
const TRIM_UPTO: &str = r#"
local ch = ARGV[2]
local ck = P .. 'c:' .. ch
local cap = tonumber(ARGV[4])
local top = 0
local entries = redis.call('XRANGE', ck, '-', ARGV[3], 'COUNT', cap)
for _, e in ipairs(entries) do
  local s = drop(ck, e[1])
  if s > top then top = s end
end
note_pruned(ch, top)
forget_if_empty(ch, ck)
local more = 0
if #entries == cap then more = 1 end
return {#entries, more}
"#;

/// Reads records through an index, in one round trip. ARGV: prefix, mode, start, end, limit, names.
/// Mode `f`: channel `names[1]` ascending from start to end; `b`: the same descending (end is the upper
/// bound); `t`: records having any of `names` as canonical or alternate topic, ascending. Returns log
/// entries.
const READ: &str = r#"
local P = ARGV[1]
local mode = ARGV[2]
local limit = tonumber(ARGV[5])
local sids = {}
if mode == 'f' then
  for _, e in ipairs(redis.call('XRANGE', P .. 'c:' .. ARGV[6], ARGV[3], ARGV[4], 'COUNT', ARGV[5])) do
    sids[#sids + 1] = e[1]
  end
elseif mode == 'b' then
  for _, e in ipairs(redis.call('XREVRANGE', P .. 'c:' .. ARGV[6], ARGV[4], ARGV[3], 'COUNT', ARGV[5])) do
    sids[#sids + 1] = e[1]
  end
else
  local seen = {}
  local seqs = {}
  for i = 6, #ARGV do
    for _, k in ipairs({P .. 'c:' .. ARGV[i], P .. 'a:' .. ARGV[i]}) do
      for _, e in ipairs(redis.call('XRANGE', k, ARGV[3], ARGV[4], 'COUNT', ARGV[5])) do
        local s = tonumber(string.match(e[1], '^(%d+)'))
        if not seen[s] then
          seen[s] = true
          seqs[#seqs + 1] = s
        end
      end
    end
  end
  table.sort(seqs)
  for i = 1, math.min(#seqs, limit) do sids[#sids + 1] = string.format('%d', seqs[i]) .. '-0' end
end
local out = {}
for _, sid in ipairs(sids) do
  local e = redis.call('XRANGE', P .. 'log', sid, sid)
  if e[1] then out[#out + 1] = e[1] end
end
return out
"#;

/// Adds or refreshes presence entries, expiring `ttl` ms from Redis's clock (the nodes' clocks do not
/// matter). ARGV: prefix, ttl, then (channel, client, info JSON) triples.
const PRESENCE_ADD: &str = r#"
local P = ARGV[1]
local t = redis.call('TIME')
local ttl = tonumber(ARGV[2])
local until_ms = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl)
for i = 3, #ARGV, 3 do
  local z = P .. 'pz:' .. ARGV[i]
  local h = P .. 'ph:' .. ARGV[i]
  redis.call('ZADD', z, until_ms, ARGV[i + 1])
  redis.call('HSET', h, ARGV[i + 1], ARGV[i + 2])
  redis.call('PEXPIRE', z, ttl * 2)
  redis.call('PEXPIRE', h, ttl * 2)
end
return 0
"#;

/// The live presence of a channel (expired entries are removed). ARGV: prefix, channel. Returns the
/// info JSON of each present client.
const PRESENCE_LIST: &str = r#"
local P = ARGV[1]
local t = redis.call('TIME')
local now = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local z = P .. 'pz:' .. ARGV[2]
local h = P .. 'ph:' .. ARGV[2]
local gone = redis.call('ZRANGEBYSCORE', z, '-inf', now)
if #gone > 0 then
  redis.call('ZREMRANGEBYSCORE', z, '-inf', now)
  for i = 1, #gone, 1000 do
    redis.call('HDEL', h, unpack(gone, i, math.min(i + 999, #gone)))
  end
end
local live = redis.call('ZRANGEBYSCORE', z, '(' .. now, '+inf')
local out = {}
for i = 1, #live, 1000 do
  for _, v in ipairs(redis.call('HMGET', h, unpack(live, i, math.min(i + 999, #live)))) do
    if v then out[#out + 1] = v end
  end
end
return out
"#;

/// The scripts, hashed once.
pub(super) struct Scripts {
    pub init: ::redis::Script,
    pub append: ::redis::Script,
    pub trim: ::redis::Script,
    pub remove: ::redis::Script,
    pub trim_upto: ::redis::Script,
    pub read: ::redis::Script,
    pub presence_add: ::redis::Script,
    pub presence_list: ::redis::Script,
}

impl Scripts {
    pub fn new() -> Scripts {
        let with_prelude = |body: &str| ::redis::Script::new(&format!("{PRELUDE}{body}"));
        Scripts {
            init: ::redis::Script::new(INIT),
            append: with_prelude(APPEND),
            trim: with_prelude(TRIM),
            remove: with_prelude(REMOVE),
            trim_upto: with_prelude(TRIM_UPTO),
            read: ::redis::Script::new(READ),
            presence_add: ::redis::Script::new(PRESENCE_ADD),
            presence_list: ::redis::Script::new(PRESENCE_LIST),
        }
    }

    /// Every script, to load them in one go when Redis lost its script cache.
    pub fn all(&self) -> [&::redis::Script; 8] {
        [
            &self.init,
            &self.append,
            &self.trim,
            &self.remove,
            &self.trim_upto,
            &self.read,
            &self.presence_add,
            &self.presence_list,
        ]
    }
}
