"""The Lua scripts that move job records atomically (Redis runs each script as one step).

Why Lua and not WATCH/MULTI: a status move reads the record, checks the fencing token and updates
the record, the indexes and the counters together; a script does that in one round trip with no
retry loop. The queued set of a job's model is named from the record's `model` field inside the
scripts (fine on a single Redis; a cluster would need hash tags).
"""

# Give back a finished/dead job's share of the queued-work counters. Expects `job_id`, KEYS
# `active_cost` (job → "owner|cost|model") and `costs` (global / owner:<o> / model:<m> → outstanding
# cost). Entries written before per-model accounting ("owner|cost") release global and owner only.
_RELEASE_COST = """
local function release_cost(active_cost, costs, job_id)
  local c = redis.call('HGET', active_cost, job_id)
  if c then
    local owner, cost, model = string.match(c, '^([^|]*)|(%d+)|(.*)$')
    if not owner then owner, cost = string.match(c, '^(.*)|(%d+)$') end
    redis.call('HINCRBY', costs, 'global', 0 - tonumber(cost))
    redis.call('HINCRBY', costs, 'owner:' .. owner, 0 - tonumber(cost))
    if model then redis.call('HINCRBY', costs, 'model:' .. model, 0 - tonumber(cost)) end
    redis.call('HDEL', active_cost, job_id)
  end
end
"""

# KEYS: job, running, metrics, active_cost, costs, queued_models, expiry
# ARGV: allowed (comma-separated), new status, fencing attempt ('' = any), score (queued/running
#       set), bump attempt (0/1), charge (added to attempts), prefix, retention_s, field/value pairs...
# Returns {previous status, attempt, attempts}, or false when the job is missing, in another status
# or on another attempt. Repeating a move that already happened for the same attempt (a retry
# after a lost reply) succeeds again without changing anything.
TRANSITION = _RELEASE_COST + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
local attempt = redis.call('HGET', KEYS[1], 'attempt') or '0'
if ARGV[3] ~= '' and attempt ~= ARGV[3] then return false end
local allowed_now = false
for allowed in string.gmatch(ARGV[1], '[^,]+') do
  if status == allowed then allowed_now = true end
end
if not allowed_now then
  if status == ARGV[2] and ARGV[3] ~= '' and ARGV[5] == '0' then
    return {status, attempt, redis.call('HGET', KEYS[1], 'attempts') or '0'}
  end
  return false
end
local id = string.match(KEYS[1], '[^:]+$')
local model = redis.call('HGET', KEYS[1], 'model')
local queued = ARGV[7] .. ':queued:' .. model
if ARGV[5] == '1' then
  attempt = tostring(redis.call('HINCRBY', KEYS[1], 'attempt', 1))
  redis.call('HSET', KEYS[1], 'rq_id', id .. '-' .. attempt)
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', tonumber(ARGV[6]))
redis.call('HSET', KEYS[1], 'status', ARGV[2], unpack(ARGV, 9))
redis.call('ZREM', queued, id)
redis.call('ZREM', KEYS[2], id)
if ARGV[2] == 'queued' then
  redis.call('ZADD', queued, ARGV[4], id)
  redis.call('SADD', KEYS[6], model)
elseif ARGV[2] == 'running' then
  redis.call('ZADD', KEYS[2], ARGV[4], id)
else
  redis.call('HINCRBY', KEYS[3], 'jobs_' .. ARGV[2], 1)
  release_cost(KEYS[4], KEYS[5], id)
  -- retention counts from the end of the job; the janitor deletes record and results then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[7], tonumber(t[1]) + tonumber(ARGV[8]), id)
  redis.call('EXPIRE', KEYS[1], math.floor(tonumber(ARGV[8]) * 2 + 3600))
end
return {status, attempt, tostring(attempts)}
"""

# KEYS: job, idempotency key, queued (the model's), metrics, active_cost, costs, queued_models
# ARGV: job id, ttl_s, fingerprint, now, cost, owner, global cap, owner cap, model, model cap,
#       field/value pairs... (a cap of 0 = none)
# Returns {'ok'}, {'idem', "<job id>:<fingerprint>"} or {'over', scope, outstanding, cap}.
SUBMIT = """
local use_idem = KEYS[2] ~= KEYS[1] .. ':noidem'
if use_idem then
  local existing = redis.call('GET', KEYS[2])
  if existing then return {'idem', existing} end
end
local cost = tonumber(ARGV[5])
local global = tonumber(redis.call('HGET', KEYS[6], 'global') or '0')
if tonumber(ARGV[7]) > 0 and global + cost > tonumber(ARGV[7]) then
  return {'over', 'global', tostring(global), ARGV[7]}
end
local mine = tonumber(redis.call('HGET', KEYS[6], 'owner:' .. ARGV[6]) or '0')
if tonumber(ARGV[8]) > 0 and mine + cost > tonumber(ARGV[8]) then
  return {'over', 'owner', tostring(mine), ARGV[8]}
end
local model_total = tonumber(redis.call('HGET', KEYS[6], 'model:' .. ARGV[9]) or '0')
if tonumber(ARGV[10]) > 0 and model_total + cost > tonumber(ARGV[10]) then
  return {'over', 'model', tostring(model_total), ARGV[10]}
end
redis.call('HSET', KEYS[1], unpack(ARGV, 11))
redis.call('EXPIRE', KEYS[1], ARGV[2])
if use_idem then redis.call('SET', KEYS[2], ARGV[1] .. ':' .. ARGV[3], 'EX', ARGV[2]) end
redis.call('HINCRBY', KEYS[6], 'global', cost)
redis.call('HINCRBY', KEYS[6], 'owner:' .. ARGV[6], cost)
redis.call('HINCRBY', KEYS[6], 'model:' .. ARGV[9], cost)
redis.call('HSET', KEYS[5], ARGV[1], ARGV[6] .. '|' .. ARGV[5] .. '|' .. ARGV[9])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
redis.call('SADD', KEYS[7], ARGV[9])
redis.call('HINCRBY', KEYS[4], 'jobs_submitted', 1)
return {'ok'}
"""

# KEYS: job. ARGV: attempt, step, total. Returns 0 (go on), 1 (cancel requested), 2 (not this
# attempt's job any more: stop and discard).
PROGRESS = """
local s = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'cancel_requested')
if s[1] ~= 'running' or s[2] ~= ARGV[1] then return 2 end
redis.call('HSET', KEYS[1], 'step', ARGV[2], 'total', ARGV[3])
if s[3] == '1' then return 1 end
return 0
"""

# KEYS: workers (name → expiry), the worker's info key. ARGV: ttl_s, name, info JSON.
# Redis server time, so host clocks need not agree.
HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'PX', math.floor(tonumber(ARGV[1]) * 1000))
return 1
"""

# KEYS: workers. ARGV: prefix. Returns the info JSON of every worker whose heartbeat has not expired.
LIVE_WORKERS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local names = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
if #names == 0 then return {} end
local keys = {}
for i, name in ipairs(names) do keys[i] = ARGV[1] .. ':worker:' .. name end
return redis.call('MGET', unpack(keys))
"""

# A job whose record vanished while it was active. KEYS: running, active_cost, costs, queued (its
# model's, or any key when unknown). ARGV: job id.
GONE = _RELEASE_COST + """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
release_cost(KEYS[2], KEYS[3], ARGV[1])
return 1
"""

# Queued jobs whose queue message is gone (neither waiting in the RQ queue nor taken by a worker,
# i.e. not in RQ's started registry). Run in Redis, so a pass over 10,000 queued jobs is one round
# trip. KEYS: the model's queued set, its RQ queue list, its RQ started registry.
# ARGV: enqueued before (epoch s), prefix. Returns {{"<id>:<attempt>" lost...}, {id whose record is gone...}}.
LOST_QUEUED = """
local present = {}
for _, rq_id in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do present[rq_id] = true end
for _, member in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  present[string.match(member, '^([^:]+)')] = true  -- members are "<rq id>:<execution id>"
end
local lost, gone = {}, {}
local before = tonumber(ARGV[1])
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local s = redis.call('HMGET', ARGV[2] .. ':job:' .. id, 'status', 'rq_id', 'enqueued_at', 'attempt')
  if not s[1] then
    table.insert(gone, id)
  elseif s[1] ~= 'queued' then
    redis.call('ZREM', KEYS[1], id)
  elseif tonumber(s[3] or '0') < before and not present[s[2]] then
    table.insert(lost, id .. ':' .. s[4])
  end
end
return {lost, gone}
"""

# A job record and, when queued, its place in its model's line: one round trip for a status poll.
# KEYS: job. ARGV: prefix. Returns {flat field/value list, rank or false}.
GET_WITH_POSITION = """
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return {fields, false} end
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' then return {fields, false} end
local id = string.match(KEYS[1], '[^:]+$')
return {fields, redis.call('ZRANK', ARGV[1] .. ':queued:' .. redis.call('HGET', KEYS[1], 'model'), id)}
"""
