-- GET a random member's balance, tier or profile at a fixed total rate.
-- args: member_prefix member_count rate_per_s threads api_key [read: balance (default), tier or profile]
package.path = debug.getinfo(1, "S").source:match("@(.*/)") .. "?.lua;" .. package.path
require("common")
require("pacing")
require("reads")

function init(args)
   member_prefix = args[1]
   member_count = tonumber(args[2])
   pace(tonumber(args[3]), tonumber(args[4]))
   headers = {["Authorization"] = "Bearer " .. args[5]}
   suffix = read_suffix(args[6])
   math.randomseed(os.time() * 1000 + tid)
end

function request()
   local member = member_prefix .. math.random(0, member_count - 1)
   return wrk.format("GET", "/v1/members/" .. member .. suffix, headers)
end
