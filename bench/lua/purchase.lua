-- POST a purchase with a unique purchase_id to a random pre-enrolled member.
-- args: member_count run_prefix api_key [fixed_member_id]
package.path = debug.getinfo(1, "S").source:match("@(.*/)") .. "?.lua;" .. package.path
require("common")

function init(args)
   member_count = tonumber(args[1])
   prefix = args[2]
   fixed_member = args[4]
   headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. args[3]}
   math.randomseed(os.time() * 1000 + tid)
   n = 0
end

function request()
   n = n + 1
   local member = fixed_member or ("m" .. math.random(0, member_count - 1))
   local body = string.format('{"purchase_id":"%s-%d-%d","store_id":"s-%d","amount_cents":%d}',
      prefix, tid, n, math.random(1, 50), math.random(100, 200000))
   return wrk.format("POST", "/v1/members/" .. member .. "/purchases", headers, body)
end
