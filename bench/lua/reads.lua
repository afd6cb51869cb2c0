-- Shared by the member-read scripts: a read's name to its path after /v1/members/<id>.
local suffixes = {balance = "/balance", tier = "/tier", profile = ""}

function read_suffix(read)
   local suffix = suffixes[read or "balance"]
   assert(suffix, "read is balance, tier or profile")
   return suffix
end
