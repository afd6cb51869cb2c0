-- POST an activity of type "visit" (uncapped, in the bench's programme) with a unique activity_id to a
-- random pre-enrolled member: purchase.lua's members, arguments and ids, another request.
-- args: member_prefix member_count run_id api_key
package.path = debug.getinfo(1, "S").source:match("@(.*/)") .. "?.lua;" .. package.path
require("purchase")

function request()
   n = n + 1
   local member = member_prefix .. math.random(0, member_count - 1)
   local body = string.format('{"activity_id":"%s-%d-%d","type":"visit"}', run_id, tid, n)
   return wrk.format("POST", "/v1/members/" .. member .. "/activities", headers, body)
end
