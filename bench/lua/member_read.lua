-- GET a random member's balance, tier or profile, as fast as answered.
-- args: member_prefix member_count api_key read (balance, tier or profile) [query, e.g. min_position=1]
package.path = debug.getinfo(1, "S").source:match("@(.*/)") .. "?.lua;" .. package.path
require("common")
require("reads")

function init(args)
   member_prefix = args[1]
   member_count = tonumber(args[2])
   headers = {["Authorization"] = "Bearer " .. args[3]}
   suffix = read_suffix(args[4])
   query = args[5] and ("?" .. args[5]) or ""
   math.randomseed(os.time() * 1000 + tid)
end

function request()
   local member = member_prefix .. math.random(0, member_count - 1)
   return wrk.format("GET", "/v1/members/" .. member .. suffix .. query, headers)
end
