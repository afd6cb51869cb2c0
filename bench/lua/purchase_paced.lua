-- purchase.lua at a fixed total rate.
-- args: member_prefix member_count run_id api_key rate_per_s threads
package.path = debug.getinfo(1, "S").source:match("@(.*/)") .. "?.lua;" .. package.path
require("purchase")
require("pacing")

local purchase_init = init

function init(args)
   purchase_init(args)
   pace(tonumber(args[5]), tonumber(args[6]))
end
