-- POST a purchase with a unique purchase_id to a random pre-enrolled member.
-- args: member_prefix member_count run_id api_key
-- Members are <member_prefix>0 .. <member_prefix><member_count - 1>; purchase
-- ids are <run_id>-<thread>-<n>, unique within a run (run ids differ per run).
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
   local body = string.format('{"purchase_id":"%s-%d-%d","store_id":"s-%d","amount_cents":%d}',
      run_id, tid, n, math.random(1, 50), math.random(100, 200000))
   return wrk.format("POST", "/v1/members/" .. member .. "/purchases", headers, body)
end
