-- Webhook event scripts of gateway/broker/redis_events.py. Sections start with `-- @script NAME`;
-- the `common` section is prepended to every other one. Redis runs a script atomically: a
-- user's first connection in the cluster, its last one out, a dead process's entries found
-- expired, are each decided once, and the event is appended to the outbox IN THE SAME STEP,
-- so two processes that race (or both run the cleanup) never both emit it, and a process
-- that dies right after cannot lose it.
--
-- One "dimension" per call (users or rooms); every key shares the hash tag {<prefix>wh}, so a
-- script's keys are in one Redis Cluster slot. KEYS:
--   1 members  zset  "<node>|<subject>" -> expiry (ms, Redis clock): a process holds a subject
--   2 owner    hash  member -> subject
--   3 count    hash  subject -> processes holding it
--   4 pending  hash  subject -> "<ms>:<node>": an offline/vacated waiting out the debounce
--   5 outbox   stream of events (fields t type, k kind, s subject, ts ms, n nonce)
-- ARGV (common): 1 ttl_ms, 2 node, 3 cleanup 0/1, 4 stale_ms, 5 on type, 6 off type,
--   7 kind (user|room), 8 outbox maxlen, 9 nonce

-- @script common
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local now = now_ms()

local function emit(typ, subject)
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[8], '*', 't', typ, 'k', ARGV[7], 's', subject,
             'ts', now, 'n', ARGV[9])
end

-- Forget one member (already out of KEYS[1]); returns its subject if it was the last holder.
local function drop(member)
  local s = redis.call('HGET', KEYS[2], member)
  redis.call('HDEL', KEYS[2], member)
  if not s then return nil end
  if redis.call('HINCRBY', KEYS[3], s, -1) > 0 then return nil end
  redis.call('HDEL', KEYS[3], s)
  return s
end

-- A dead process's members (not refreshed within the TTL) and pending events whose process
-- died before confirming them: removed, and their offline/vacated appended at once (they are
-- a TTL old: a quick reconnect would already have cancelled them).
local function cleanup()
  local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1000)
  for _, member in ipairs(dead) do
    redis.call('ZREM', KEYS[1], member)
    local s = drop(member)
    if s then
      redis.call('HDEL', KEYS[4], s)
      emit(ARGV[6], s)
    end
  end
  local stale = now - tonumber(ARGV[4])
  local pend = redis.call('HGETALL', KEYS[4])
  for i = 1, #pend, 2 do
    local at = tonumber(string.match(pend[i + 1], '^(%d+):'))
    if at and at < stale then
      redis.call('HDEL', KEYS[4], pend[i])
      emit(ARGV[6], pend[i])
    end
  end
end

-- @script update
-- ARGV from 10: op ("a" add/refresh, "r" remove), member, subject. Returns the pending
-- offline/vacated events flat: subject, token, subject, token...
local ttl = tonumber(ARGV[1])
local pending = {}
for i = 10, #ARGV, 3 do
  local member, subject = ARGV[i + 1], ARGV[i + 2]
  if ARGV[i] == 'a' then
    if redis.call('ZADD', KEYS[1], now + ttl, member) == 1 then
      redis.call('HSET', KEYS[2], member, subject)
      if redis.call('HINCRBY', KEYS[3], subject, 1) == 1 then
        -- back within the debounce: the pending offline/vacated is cancelled, nothing is said
        if redis.call('HDEL', KEYS[4], subject) == 0 then emit(ARGV[5], subject) end
      end
    end
  elseif redis.call('ZREM', KEYS[1], member) == 1 then
    local gone = drop(member)
    if gone then
      local token = now .. ':' .. ARGV[2]
      redis.call('HSET', KEYS[4], gone, token)
      pending[#pending + 1] = gone
      pending[#pending + 1] = token
    end
  end
end
-- After the ops: a late heartbeat refreshes its own members before the cleanup could take
-- them for a dead process's.
if ARGV[3] == '1' then cleanup() end
return pending

-- @script confirm
-- ARGV from 10: subject, token pairs. Appends the events still pending with that token.
local n = 0
for i = 10, #ARGV, 2 do
  if redis.call('HGET', KEYS[4], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[4], ARGV[i])
    emit(ARGV[6], ARGV[i])
    n = n + 1
  end
end
return n
