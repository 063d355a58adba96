"""The Lua scripts of the Redis tier, with their SHA1s (see `featureplane.stores.redis`).

Each script is idempotent, so a call rerun after NOSCRIPT or a timeout is safe.
"""

from __future__ import annotations

import hashlib

# KEYS[1] the set; ARGV[1] max_items; ARGV[2] cutoff lex bound or ""; ARGV[3] now (ms);
# ARGV[4] retention (ms) or ""; ARGV[5..] members (version .. value), oldest first.
TIMESERIES_LUA = """
local key = KEYS[1]
for i = 5, #ARGV do
  local v = string.sub(ARGV[i], 1, 26)
  redis.call('ZREMRANGEBYLEX', key, '[' .. v, '[' .. v .. '\\255')
  redis.call('ZADD', key, 0, ARGV[i])
end
if ARGV[2] ~= '' then
  redis.call('ZREMRANGEBYLEX', key, '-', '(' .. ARGV[2])
end
redis.call('ZREMRANGEBYRANK', key, 0, -(tonumber(ARGV[1]) + 1))
if ARGV[4] ~= '' then
  local newest = redis.call('ZREVRANGE', key, 0, 0)[1]
  if newest then
    local ttl = tonumber(string.sub(newest, 1, 13)) + tonumber(ARGV[4]) - tonumber(ARGV[3])
    if ttl > 0 then
      redis.call('PEXPIRE', key, string.format('%.0f', ttl))
    else
      redis.call('DEL', key)
    end
  end
end
return redis.call('ZCARD', key)
"""

# KEYS[1] the string; ARGV[1] version .. value. Versions are compared as numbers (ts, then
# the hex hash), not with Lua's `<`, which follows the server's locale collation.
LATEST_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local new = ARGV[1]
  local cts, nts = tonumber(string.sub(cur, 1, 13)), tonumber(string.sub(new, 1, 13))
  if cts > nts then return 0 end
  if cts == nts and tonumber(string.sub(cur, 15, 26), 16) > tonumber(string.sub(new, 15, 26), 16)
  then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""

# Cache writes. KEYS[1] the set; ARGV[1] max_items; ARGV[2] cutoff lex bound or "";
# ARGV[3] ttl (ms); ARGV[4] "1" = only if the key exists (write-through), "0" = create (fill);
# ARGV[5..] members, any order. Returns the set's size, or -1 when nothing was written.
CACHE_TIMESERIES_LUA = """
local key = KEYS[1]
if ARGV[4] == '1' and redis.call('EXISTS', key) == 0 then return -1 end
for i = 5, #ARGV do
  local v = string.sub(ARGV[i], 1, 26)
  redis.call('ZREMRANGEBYLEX', key, '[' .. v, '[' .. v .. '\\255')
  redis.call('ZADD', key, 0, ARGV[i])
end
if ARGV[2] ~= '' then
  redis.call('ZREMRANGEBYLEX', key, '-', '(' .. ARGV[2])
end
redis.call('ZREMRANGEBYRANK', key, 0, -(tonumber(ARGV[1]) + 1))
if redis.call('EXISTS', key) == 1 then redis.call('PEXPIRE', key, ARGV[3]) end
return redis.call('ZCARD', key)
"""

# KEYS[1] the string; ARGV[1] version .. value; ARGV[2] ttl (ms). Newest wins as in
# LATEST_LUA; the expiry is refreshed only when the value was written.
CACHE_LATEST_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local new = ARGV[1]
  local cts, nts = tonumber(string.sub(cur, 1, 13)), tonumber(string.sub(new, 1, 13))
  if cts > nts then return 0 end
  if cts == nts and tonumber(string.sub(cur, 15, 26), 16) > tonumber(string.sub(new, 15, 26), 16)
  then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# Write-through of many keys in one call (the rules of the two scripts above, with ARGV[4]
# = "1"). KEYS[1..n]: value keys; KEYS[n+1..]: negative markers to delete. ARGV[1]: n;
# then per value key: "l", ttl, member | "t", ttl, max_items, cutoff or "", count, members.
# Returns n.
CACHE_THROUGH_LUA = """
local n = tonumber(ARGV[1])
local a = 2
for k = 1, n do
  local key, kind, ttl = KEYS[k], ARGV[a], ARGV[a + 1]
  if kind == 'l' then
    local new = ARGV[a + 2]
    a = a + 3
    local cur = redis.call('GET', key)
    local newer = true
    if cur then
      local cts, nts = tonumber(string.sub(cur, 1, 13)), tonumber(string.sub(new, 1, 13))
      if cts > nts then newer = false
      elseif cts == nts and tonumber(string.sub(cur, 15, 26), 16)
          > tonumber(string.sub(new, 15, 26), 16) then newer = false end
    end
    if newer then redis.call('SET', key, new, 'PX', ttl) end
  else
    local cap, low, count = tonumber(ARGV[a + 2]), ARGV[a + 3], tonumber(ARGV[a + 4])
    local first = a + 5
    a = first + count
    if redis.call('EXISTS', key) == 1 then
      for i = first, a - 1 do
        local v = string.sub(ARGV[i], 1, 26)
        redis.call('ZREMRANGEBYLEX', key, '[' .. v, '[' .. v .. '\\255')
        redis.call('ZADD', key, 0, ARGV[i])
      end
      if low ~= '' then redis.call('ZREMRANGEBYLEX', key, '-', '(' .. low) end
      redis.call('ZREMRANGEBYRANK', key, 0, -(cap + 1))
      if redis.call('EXISTS', key) == 1 then redis.call('PEXPIRE', key, ttl) end
    end
  end
end
for k = n + 1, #KEYS do redis.call('DEL', KEYS[k]) end
return n
"""

# Cache reads, one call a batch. KEYS: value key, negative key, ... ; ARGV[i]: "l" (latest)
# or "t" (timeseries) of the i-th pair. Returns value, PTTL, negative PTTL per pair.
CACHE_READ_LUA = """
local out = {}
for i = 1, #ARGV do
  local k = KEYS[2 * i - 1]
  if ARGV[i] == 'l' then
    out[#out + 1] = redis.call('GET', k)
  else
    out[#out + 1] = redis.call('ZREVRANGE', k, 0, -1)
  end
  out[#out + 1] = redis.call('PTTL', k)
  out[#out + 1] = redis.call('PTTL', KEYS[2 * i])
end
return out
"""

TIMESERIES_SHA = hashlib.sha1(TIMESERIES_LUA.encode(), usedforsecurity=False).hexdigest()
LATEST_SHA = hashlib.sha1(LATEST_LUA.encode(), usedforsecurity=False).hexdigest()
CACHE_TIMESERIES_SHA = hashlib.sha1(
    CACHE_TIMESERIES_LUA.encode(), usedforsecurity=False
).hexdigest()
CACHE_LATEST_SHA = hashlib.sha1(CACHE_LATEST_LUA.encode(), usedforsecurity=False).hexdigest()
CACHE_READ_SHA = hashlib.sha1(CACHE_READ_LUA.encode(), usedforsecurity=False).hexdigest()
CACHE_THROUGH_SHA = hashlib.sha1(CACHE_THROUGH_LUA.encode(), usedforsecurity=False).hexdigest()
SCRIPTS = (
    (CACHE_READ_LUA, CACHE_READ_SHA),
    (TIMESERIES_LUA, TIMESERIES_SHA),
    (LATEST_LUA, LATEST_SHA),
    (CACHE_TIMESERIES_LUA, CACHE_TIMESERIES_SHA),
    (CACHE_LATEST_LUA, CACHE_LATEST_SHA),
    (CACHE_THROUGH_LUA, CACHE_THROUGH_SHA),
)
