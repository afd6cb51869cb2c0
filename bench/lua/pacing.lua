-- A fixed total request rate for wrk (it has no -R): delay() hands out send
-- slots on a per-thread schedule read from CLOCK_MONOTONIC through LuaJIT's ffi.
-- Latency is then measured from each request's own send (wrk's timer).
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

local interval_ms, next_ms

function pace(rate_per_s, threads)
   interval_ms = 1000 / (rate_per_s / threads)
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
