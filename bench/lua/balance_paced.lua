-- GET a random member's balance at a fixed total rate (wrk has no -R: we pace
-- with delay(), on a per-thread schedule read from CLOCK_MONOTONIC via ffi).
-- args: member_prefix member_count rate_per_s threads api_key
package.path = debug.getinfo(1, "S").source:match("@(.*/)") .. "?.lua;" .. package.path
require("common")
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")

local function now_ms()
   ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
   return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

function init(args)
   member_prefix = args[1]
   member_count = tonumber(args[2])
   interval_ms = 1000 / (tonumber(args[3]) / tonumber(args[4]))
   headers = {["Authorization"] = "Bearer " .. args[5]}
   math.randomseed(os.time() * 1000 + tid)
   next_ms = nil
end

function delay()
   local t = now_ms()
   if next_ms == nil then next_ms = t end
   local slot = next_ms
   next_ms = next_ms + interval_ms
   local wait = slot - t
   if wait < 0 then return 0 end
   return wait
end

function request()
   local member = member_prefix .. math.random(0, member_count - 1)
   return wrk.format("GET", "/v1/members/" .. member .. "/balance", headers)
end
