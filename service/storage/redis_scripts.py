"""The Lua scripts of the Redis store. Each runs atomically on the Redis server.

Every key a script touches is passed in KEYS (all share one hash tag, so Redis Cluster
keeps them on one slot). Writes come after every check, so a script either changes
nothing or does all of its work.
"""

from __future__ import annotations

# KEYS: 1 conversation -> open handoff, 2 handoff hash, 3 visitor -> handoff, 4 pending zset
# ARGV: 1 id, 2 record JSON, 3 version, 4 created_at_ms, 5 retention ms, 6 '1' when pending
# Returns the id of the conversation's open handoff: ARGV[1] when this call created it.
CREATE = """
local current = redis.call('GET', KEYS[1])
if current then
  return current
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[5])
redis.call('HSET', KEYS[2], 'rec', ARGV[2], 'v', ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[5])
if ARGV[6] == '1' then
  redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
end
return ARGV[1]
"""

# Which of ARGV[first..last] are members of the set ``key``: one 0/1 flag each, asked in
# chunks (unpack takes a few thousand values at most).
_FLAGS = """
local function flags(key, first, last)
  local found = {}
  for from = first, last, 1000 do
    local part = redis.call('SMISMEMBER', key, unpack(ARGV, from, math.min(from + 999, last)))
    for _, flag in ipairs(part) do
      found[#found + 1] = flag
    end
  end
  return found
end
"""

# What a webhook reads, in one command: a pipeline of three cost a quarter of a webhook's
# CPU on Redis in a py-spy profile under make bench's load. Read-only.
# KEYS: 1 handoff hash, 2 seen-ids set, 3 sent-ids set. ARGV: the message ids (unique).
# Returns {record or nil} when there is no record or no id, else {record, seen, sent}:
# one 0/1 flag per id in each.
READ_FOR_WEBHOOK = (
    _FLAGS
    + """
local record = redis.call('HGET', KEYS[1], 'rec')
if not record or #ARGV == 0 then
  return {record}
end
return {record, flags(KEYS[2], 1, #ARGV), flags(KEYS[3], 1, #ARGV)}
"""
)

# Removes a conversation's pointer to a handoff that no longer exists (expired record).
# KEYS: 1 conversation key. ARGV: 1 the stale handoff id.
RELEASE_CONVERSATION = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: 1 handoff hash, 2 conversation key, 3 visitor key, 4 Brevo conversation key,
#       5 pending zset, 6 seen set, 7 sent set, 8 client hash, 9 handoff stream,
#       10 all-events stream, 11 sequence counter, 12 held zset
# ARGV: 1 expected version, 2 new version, 3 record JSON, 4 state, 5 handoff id,
#       6 created_at_ms, 7 Brevo conversation id ('' = none), 8 commit token,
#       9 retention ms, 10 handoff stream MAXLEN, 11 all-events MAXLEN, 12 conversation id,
#       13 when its next held message is due ('' = none held),
#       14 number of events, 15 number of message ids that must be new (neither seen nor
#       sent), then those ids, then (occurred_at_ms, received_at_ms, payload JSON) per event,
#       then the number of seen ids and the ids, the number of sent ids and the ids,
#       then client_message_id and brevo_message_id ('' '' = none).
# Each entry has fields h (handoff id), c (conversation id), t (occurred_at_ms),
# r (received_at_ms), p (payload JSON) and q: the position of the handoff's previous event,
# so that a reader can tell whether MAXLEN trimmed events it had not read (a handoff's
# positions are not contiguous).
# Returns {'ok', seqs} or {'done', seqs} (this commit token already applied: a resent
# command after a lost reply), {'missing'}, or, when the version moved or one of the ids is
# known, {'stale', record, seen, sent}: what READ_FOR_WEBHOOK answers for those ids (one 0/1
# flag per id in each), for the change to be planned again. seqs is "1,2,3".
COMMIT = (
    _FLAGS
    + """
local version = redis.call('HGET', KEYS[1], 'v')
if not version then
  return {'missing'}
end
local checked = tonumber(ARGV[15])
local function stale(seen, sent)
  return {'stale', redis.call('HGET', KEYS[1], 'rec'),
    seen or flags(KEYS[6], 16, 15 + checked), sent or flags(KEYS[7], 16, 15 + checked)}
end
if version ~= ARGV[1] then
  if redis.call('HGET', KEYS[1], 'lc') == ARGV[8] then
    return {'done', redis.call('HGET', KEYS[1], 'ls')}
  end
  return stale()
end
if checked > 0 then
  local seen, sent = flags(KEYS[6], 16, 15 + checked), flags(KEYS[7], 16, 15 + checked)
  for k = 1, checked do
    if seen[k] == 1 or sent[k] == 1 then
      return stale(seen, sent)
    end
  end
end
local id = ARGV[5]
local ttl = ARGV[9]
local seqs = {}
local previous = redis.call('HGET', KEYS[1], 'last') or '0'
local i = 16 + checked
for _ = 1, tonumber(ARGV[14]) do
  local seq = string.format('%d', redis.call('INCR', KEYS[11]))
  local entry = '0-' .. seq
  redis.call('XADD', KEYS[9], 'MAXLEN', '~', ARGV[10], entry,
    'h', id, 'c', ARGV[12], 't', ARGV[i], 'r', ARGV[i + 1], 'p', ARGV[i + 2], 'q', previous)
  redis.call('XADD', KEYS[10], 'MAXLEN', '~', ARGV[11], entry,
    'h', id, 'c', ARGV[12], 't', ARGV[i], 'r', ARGV[i + 1], 'p', ARGV[i + 2], 'q', previous)
  seqs[#seqs + 1] = seq
  previous = seq
  i = i + 3
end
-- A count, then that many ids, from ARGV[i] on; returns the index after them.
local function add_ids(key, at)
  local count = tonumber(ARGV[at])
  for k = 1, count do
    redis.call('SADD', key, ARGV[at + k])
  end
  return at + count + 1
end
i = add_ids(KEYS[6], i)
i = add_ids(KEYS[7], i)
if ARGV[i] ~= '' then
  redis.call('HSETNX', KEYS[8], ARGV[i], ARGV[i + 1])
end
local applied = table.concat(seqs, ',')
redis.call('HSET', KEYS[1], 'rec', ARGV[3], 'v', ARGV[2], 'lc', ARGV[8], 'ls', applied,
  'last', previous)
local owner = redis.call('GET', KEYS[2])
if ARGV[4] == 'ENDED' then
  if owner == id then
    redis.call('DEL', KEYS[2])
  end
elseif owner == id then
  redis.call('PEXPIRE', KEYS[2], ttl)
elseif not owner then
  redis.call('SET', KEYS[2], id, 'PX', ttl)
end
if ARGV[4] == 'PENDING_AGENT' then
  redis.call('ZADD', KEYS[5], ARGV[6], id)
else
  redis.call('ZREM', KEYS[5], id)
end
if ARGV[13] ~= '' then
  redis.call('ZADD', KEYS[12], ARGV[13], id)
else
  redis.call('ZREM', KEYS[12], id)
end
if ARGV[7] ~= '' then
  local newest = redis.call('GET', KEYS[4])
  local created = tonumber(ARGV[6])
  if (not newest) or tonumber(string.match(newest, '^(%d+):')) <= created then
    redis.call('SET', KEYS[4], ARGV[6] .. ':' .. id, 'PX', ttl)
  end
end
for _, key in ipairs({KEYS[1], KEYS[3], KEYS[6], KEYS[7], KEYS[8], KEYS[9]}) do
  redis.call('PEXPIRE', key, ttl)
end
return {'ok', applied}
"""
)

# Leases (see redis_locks). KEYS: 1 lock key. ARGV: 1 owner token, 2 lease ms (RENEW).
RENEW_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
