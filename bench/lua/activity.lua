-- POST an activity of type "visit" (uncapped, in the bench's programme) with a unique activity_id to a
-- random pre-enrolled member.
-- args: member_prefix member_count run_id api_key
package.path = debug.getinfo(1, "S").source:match("@(.*/)") .. "?.lua;" .. package.path
require("common")

function init(args)
   member_prefix = args[1]
   member_count = tonumber(args[2])
   run_id = args[3]
   headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. args[4]}
   math.randomseed(os.time() * 1000 + tid)
   n = 0
end

function request()
   n = n + 1
   local member = member_prefix .. math.random(0, member_count - 1)
   local body = string.format('{"activity_id":"%s-%d-%d","type":"visit"}', run_id, tid, n)
   return wrk.format("POST", "/v1/members/" .. member .. "/activities", headers, body)
end
