-- POST the first purchase of freshly enrolled members <member_prefix>0, 1, 2, ... in turn, each once,
-- of at least 50 yuan (a referee's first purchase qualifies: CONTRACT §6.4).
-- args: member_prefix api_key
-- One wrk thread (the bench's default): its counter gives each request its own member. The members
-- must outnumber the requests: a purchase of a member not enrolled is a 404 and fails the run.
package.path = debug.getinfo(1, "S").source:match("@(.*/)") .. "?.lua;" .. package.path
require("common")

function init(args)
   member_prefix = args[1]
   headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. args[2]}
   math.randomseed(os.time() * 1000 + tid)
   n = -1
end

function request()
   n = n + 1
   local body = string.format('{"purchase_id":"first","store_id":"s-%d","amount_cents":%d}',
      math.random(1, 50), math.random(5000, 200000))
   return wrk.format("POST", "/v1/members/" .. member_prefix .. n .. "/purchases", headers, body)
end
