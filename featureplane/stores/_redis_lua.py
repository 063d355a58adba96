"""The Lua scripts of the Redis store and cache tier, with their SHA1s.

The layout they write is `stores.redis_layout`'s; `stores.redis` and `stores.redis_cache`
say the rules they keep.

Each script is idempotent, so a call rerun after NOSCRIPT or a timeout is safe.
Every script starts with `_SHARED`, the two rules they have in common.
"""

from __future__ import annotations

import hashlib

# stored_is_newer(cur, new) is `not keys.replaces(new, cur)`: versions are compared as
# numbers (ts, then the hex hash), not with Lua's `<`, which follows the server's locale
# collation; an equal version is the same event, so it is rewritten.
# add_members: ARGV[first..last] are members (version .. value); a replayed version first
# removes itself, so it overwrites instead of duplicating. Its members are those from the
# version up to, not including, the version with its last character (a hex digit) one
# higher, whatever bytes the value holds (a bound of version .. 0xff kept the old member
# of a value starting with 0xff).
_SHARED = """
local function stored_is_newer(cur, new)
  local cts, nts = tonumber(string.sub(cur, 1, 13)), tonumber(string.sub(new, 1, 13))
  if cts ~= nts then return cts > nts end
  return tonumber(string.sub(cur, 15, 26), 16) > tonumber(string.sub(new, 15, 26), 16)
end
local function add_members(key, first, last)
  for i = first, last do
    local v = string.sub(ARGV[i], 1, 26)
    local after = string.sub(v, 1, 25) .. string.char(string.byte(v, 26) + 1)
    redis.call('ZREMRANGEBYLEX', key, '[' .. v, '(' .. after)
    redis.call('ZADD', key, 0, ARGV[i])
  end
end
"""

# KEYS[1] the set; ARGV[1] max_items; ARGV[2] cutoff lex bound or ""; ARGV[3] now (ms);
# ARGV[4] retention (ms) or ""; ARGV[5..] members (version .. value), oldest first.
TIMESERIES_LUA = (
    _SHARED
    + """
local key = KEYS[1]
add_members(key, 5, #ARGV)
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
)

# KEYS[1] the string; ARGV[1] version .. value.
LATEST_LUA = (
    _SHARED
    + """
local cur = redis.call('GET', KEYS[1])
if cur and stored_is_newer(cur, ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""
)

# Cache writes. KEYS[1] the set; ARGV[1] max_items; ARGV[2] cutoff lex bound or "";
# ARGV[3] ttl (ms); ARGV[4] "1" = only if the key exists (write-through), "0" = create (fill);
# ARGV[5..] members, any order. Returns the set's size, or -1 when nothing was written.
CACHE_TIMESERIES_LUA = (
    _SHARED
    + """
local key = KEYS[1]
if ARGV[4] == '1' and redis.call('EXISTS', key) == 0 then return -1 end
add_members(key, 5, #ARGV)
if ARGV[2] ~= '' then
  redis.call('ZREMRANGEBYLEX', key, '-', '(' .. ARGV[2])
end
redis.call('ZREMRANGEBYRANK', key, 0, -(tonumber(ARGV[1]) + 1))
if redis.call('EXISTS', key) == 1 then redis.call('PEXPIRE', key, ARGV[3]) end
return redis.call('ZCARD', key)
"""
)

# KEYS[1] the string; ARGV[1] version .. value; ARGV[2] ttl (ms). Newest wins as in
# LATEST_LUA; the expiry is refreshed only when the value was written.
CACHE_LATEST_LUA = (
    _SHARED
    + """
local cur = redis.call('GET', KEYS[1])
if cur and stored_is_newer(cur, ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
)

# Write-through of many keys in one call (the rules of the two scripts above, with ARGV[4]
# = "1"). KEYS[1..n]: value keys; KEYS[n+1..]: negative markers to delete. ARGV[1]: n;
# then per value key: "l", ttl, member | "t" or "T", ttl, max_items, cutoff or "", count,
# members. "t" appends only to a key that exists; "T" creates it (a group without a store,
# whose items Redis alone holds). Returns n.
CACHE_THROUGH_LUA = (
    _SHARED
    + """
local n = tonumber(ARGV[1])
local a = 2
for k = 1, n do
  local key, kind, ttl = KEYS[k], ARGV[a], ARGV[a + 1]
  if kind == 'l' then
    local new = ARGV[a + 2]
    a = a + 3
    local cur = redis.call('GET', key)
    if not (cur and stored_is_newer(cur, new)) then redis.call('SET', key, new, 'PX', ttl) end
  else
    local cap, low, count = tonumber(ARGV[a + 2]), ARGV[a + 3], tonumber(ARGV[a + 4])
    local first = a + 5
    a = first + count
    if kind == 'T' or redis.call('EXISTS', key) == 1 then
      add_members(key, first, a - 1)
      if low ~= '' then redis.call('ZREMRANGEBYLEX', key, '-', '(' .. low) end
      redis.call('ZREMRANGEBYRANK', key, 0, -(cap + 1))
      if redis.call('EXISTS', key) == 1 then redis.call('PEXPIRE', key, ttl) end
    end
  end
end
for k = n + 1, #KEYS do redis.call('DEL', KEYS[k]) end
return n
"""
)

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


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()


TIMESERIES_SHA = _sha(TIMESERIES_LUA)
LATEST_SHA = _sha(LATEST_LUA)
CACHE_TIMESERIES_SHA = _sha(CACHE_TIMESERIES_LUA)
CACHE_LATEST_SHA = _sha(CACHE_LATEST_LUA)
CACHE_READ_SHA = _sha(CACHE_READ_LUA)
CACHE_THROUGH_SHA = _sha(CACHE_THROUGH_LUA)
SCRIPTS = tuple(
    (script, _sha(script))
    for script in (CACHE_READ_LUA, TIMESERIES_LUA, LATEST_LUA, CACHE_TIMESERIES_LUA,
                   CACHE_LATEST_LUA, CACHE_THROUGH_LUA)
)  # fmt: skip
