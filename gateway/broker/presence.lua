-- Presence scripts of gateway/broker/redis_presence.py. Sections start with `-- @script NAME`;
-- the `common` section is prepended to every other one. Redis runs a script atomically, so
-- "first connection in" / "last connection out" of a user is decided once however many
-- processes race, and a pending leave is cancelled or published exactly once.
--
-- Room keys (one hash tag {room}: one cluster slot), KEYS[1..7]:
--   1 conns    zset  conn key -> expiry (ms, Redis clock): refreshed by its process's heartbeat
--   2 owner    hash  conn key -> user
--   3 count    hash  user -> connections in the room
--   4 users    zset  user (score 0: code-point order, for paging with ZRANGEBYLEX)
--   5 info     hash  user -> info JSON (the token claim, first connection's)
--   6 pending  hash  user -> "<ms>:<node>": a leave waiting out the debounce
--   7 events   the room's presence channel ({"j":[[user, info]...], "l":[user...]})

-- @script common
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Forget one connection (already out of KEYS[1]); returns its user if it was their last.
local function drop(ck)
  local u = redis.call('HGET', KEYS[2], ck)
  redis.call('HDEL', KEYS[2], ck)
  if not u then return nil end
  if redis.call('HINCRBY', KEYS[3], u, -1) > 0 then return nil end
  redis.call('HDEL', KEYS[3], u)
  redis.call('ZREM', KEYS[4], u)
  redis.call('HDEL', KEYS[5], u)
  return u
end

-- Connections whose process stopped refreshing them (SIGKILL, partition) and pending leaves
-- whose process died before confirming them: removed, their leaves published at once (they
-- are a TTL old: a quick reconnect would already have cancelled them).
local function cleanup(now, stale_ms, leaves)
  local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1000)
  for _, ck in ipairs(dead) do
    redis.call('ZREM', KEYS[1], ck)
    local u = drop(ck)
    if u then
      redis.call('HDEL', KEYS[6], u)
      leaves[#leaves + 1] = u
    end
  end
  local pend = redis.call('HGETALL', KEYS[6])
  for i = 1, #pend, 2 do
    local at = tonumber(string.match(pend[i + 1], '^(%d+):'))
    if at and at < now - stale_ms then
      redis.call('HDEL', KEYS[6], pend[i])
      leaves[#leaves + 1] = pend[i]
    end
  end
end

local function publish(joins, leaves)
  if #joins > 0 or #leaves > 0 then
    redis.call('PUBLISH', KEYS[7], cjson.encode({j = joins, l = leaves}))
  end
end

-- @script update
-- ARGV: ttl_ms, node, events (0/1), cleanup (0/1), stale_ms, key_ttl_ms, then per op:
-- op ("a" add/refresh, "r" remove), conn key, user, info. Returns pending leaves flat:
-- user, token, user, token...
local ttl = tonumber(ARGV[1])
local events = ARGV[3] == '1'
local now = now_ms()
local joins, leaves, pending = {}, {}, {}
for i = 7, #ARGV, 4 do
  local ck = ARGV[i + 1]
  if ARGV[i] == 'a' then
    if redis.call('ZADD', KEYS[1], now + ttl, ck) == 1 then
      local u, info = ARGV[i + 2], ARGV[i + 3]
      redis.call('HSET', KEYS[2], ck, u)
      if redis.call('HINCRBY', KEYS[3], u, 1) == 1 then
        redis.call('ZADD', KEYS[4], 0, u)
        if info ~= '' then redis.call('HSET', KEYS[5], u, info) end
        -- back within the debounce: the pending leave is cancelled and nobody hears a thing
        if redis.call('HDEL', KEYS[6], u) == 0 then joins[#joins + 1] = {u, info} end
      end
    end
  elseif redis.call('ZREM', KEYS[1], ck) == 1 then
    local gone = drop(ck)
    if gone and events then
      local token = now .. ':' .. ARGV[2]
      redis.call('HSET', KEYS[6], gone, token)
      pending[#pending + 1] = gone
      pending[#pending + 1] = token
    end
  end
end
-- After the ops: a heartbeat that comes late refreshes its own entries before the cleanup
-- could take them for a dead process's.
if ARGV[4] == '1' then cleanup(now, tonumber(ARGV[5]), leaves) end
local key_ttl = tonumber(ARGV[6])
for k = 1, 6 do redis.call('PEXPIRE', KEYS[k], key_ttl) end
if events then publish(joins, leaves) end
return pending

-- @script confirm
-- ARGV: user, token pairs. Publishes the leaves still pending with that token.
local leaves = {}
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[6], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[6], ARGV[i])
    leaves[#leaves + 1] = ARGV[i]
  end
end
publish({}, leaves)
return #leaves

-- @script members
-- ARGV: stale_ms, after ('' = first page), limit, clients (0/1). Returns {users, counts, infos,
-- more (0/1), owners}: owners (with clients=1) is the whole conn key -> user hash, flat.
local leaves = {}
cleanup(now_ms(), tonumber(ARGV[1]), leaves)
publish({}, leaves)
local lo = '-'
if ARGV[2] ~= '' then lo = '(' .. ARGV[2] end
local limit = tonumber(ARGV[3])
local users = redis.call('ZRANGEBYLEX', KEYS[4], lo, '+', 'LIMIT', 0, limit + 1)
local more = 0
if #users > limit then
  more = 1
  users[#users] = nil
end
if #users == 0 then return {{}, {}, {}, 0, {}} end
local owners = {}
if ARGV[4] == '1' then owners = redis.call('HGETALL', KEYS[2]) end
return {users, redis.call('HMGET', KEYS[3], unpack(users)), redis.call('HMGET', KEYS[5], unpack(users)), more, owners}

-- @script counts
-- ARGV: stale_ms. Returns {connections, users}.
local leaves = {}
cleanup(now_ms(), tonumber(ARGV[1]), leaves)
publish({}, leaves)
return {redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[4])}

-- @script slot
-- The cluster-wide per-user cap. KEYS[1]: the user's connections (zset conn key -> expiry ms).
-- ARGV: conn key, limit, ttl_ms. Returns 1 when counted, 0 when the user is at the limit.
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 2)
return 1

-- @script touch
-- Heartbeat of per-user slots. KEYS[1]: as for slot; ARGV: ttl_ms, conn keys...
local now = now_ms()
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now + ttl, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return 1

-- @script node
-- KEYS[1]: the processes hash (node -> "<ms>|<json>"). ARGV: node, json, stale_ms.
-- Registers this process and returns every live one's json (dead ones are dropped).
local now = now_ms()
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], ARGV[1], now .. '|' .. ARGV[2]) end
local all = redis.call('HGETALL', KEYS[1])
local live = {}
for i = 1, #all, 2 do
  local at, doc = string.match(all[i + 1], '^(%d+)|(.*)$')
  if at and tonumber(at) >= now - tonumber(ARGV[3]) then
    live[#live + 1] = doc
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return live
