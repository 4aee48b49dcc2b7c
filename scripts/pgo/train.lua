-- The training load for a PGO build (scripts/build-pgo.sh): a wide spread
-- of what a homeserver's clients and peers send, so the profile marks the
-- paths a real edge takes as hot. Deliberately not the load benchmark's
-- mix (benches/load/mix.lua): the build must not be tuned to the numbers
-- it is judged by.

local n = 0
local b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local function token(u)
  local s, v = "", u * 977 + 131
  while v > 0 do
    local i = v % 64
    s = s .. b64:sub(i + 1, i + 1)
    v = math.floor(v / 64)
  end
  return "syt_" .. s .. "_Zq8Xw2Lp0Rt6Yc4Vb1Nm_3f9e7d"
end

local json = {["Content-Type"] = "application/json"}
local body = '{"msgtype":"m.text","body":"a message of some ordinary length, with a few words in it"}'

function request()
  n = n + 1
  local k = n % 40
  local room = string.format("%%21r%05d%%3Atrain.example", (n * 104729) % 5000)
  local auth = {["Authorization"] = "Bearer " .. token(n % 3000), ["Content-Type"] = "application/json",
                ["User-Agent"] = "Element/1.11 (training)"}
  if k < 10 then
    return wrk.format("GET", "/_matrix/client/v3/sync?since=s" .. n .. "_7_0_1&timeout=0&filter=0", auth)
  elseif k < 16 then
    return wrk.format("GET", "/_matrix/client/v3/rooms/" .. room .. "/messages?dir=b&limit=20&from=t" .. n, auth)
  elseif k < 20 then
    return wrk.format("PUT", "/_matrix/client/v3/rooms/" .. room .. "/send/m.room.message/m" .. n, auth, body)
  elseif k < 22 then
    return wrk.format("PUT", "/_matrix/client/v3/rooms/" .. room .. "/typing/%40u" .. (n % 3000) .. "%3Atrain.example",
      auth, '{"typing":true,"timeout":30000}')
  elseif k < 23 then
    return wrk.format("POST", "/_matrix/client/v3/rooms/" .. room .. "/receipt/m.read/%24e" .. n, auth, "{}")
  elseif k < 24 then
    return wrk.format("GET", "/_matrix/client/v3/rooms/" .. room .. "/state/m.room.power_levels/", auth)
  elseif k < 26 then
    return wrk.format("GET", "/_matrix/client/v1/media/thumbnail/train.example/t" .. (n % 700) .. "?width=96&height=96", auth)
  elseif k < 27 then
    return wrk.format("GET", "/_matrix/media/v3/download/train.example/d" .. (n % 300), auth)
  elseif k < 28 then
    return wrk.format("POST", "/_matrix/client/v3/keys/query", auth, '{"device_keys":{"@a:train.example":[]}}')
  elseif k < 29 then
    return wrk.format("GET", "/_matrix/client/v3/profile/%40u" .. (n % 3000) .. "%3Atrain.example", auth)
  elseif k < 30 then
    return wrk.format("PUT", "/_matrix/client/v3/sendToDevice/m.room.encrypted/d" .. n, auth, '{"messages":{}}')
  elseif k < 31 then
    return wrk.format("GET", "/_matrix/client/v3/pushrules/", auth)
  elseif k < 34 then
    return wrk.format("PUT", "/_matrix/federation/v1/send/txn" .. n,
      {["Authorization"] = 'X-Matrix origin="peer' .. (n % 40) .. '.example",destination="train.example",key="ed25519:k",sig="c2ln"',
       ["Content-Type"] = "application/json"}, '{"pdus":[],"edus":[]}')
  elseif k < 35 then
    return wrk.format("GET", "/_matrix/federation/v1/event/%24e" .. n,
      {["Authorization"] = 'X-Matrix origin="peer' .. (n % 40) .. '.example",key="ed25519:k",sig="c2ln"'})
  elseif k < 36 then
    return wrk.format("GET", "/_matrix/key/v2/server")
  elseif k < 37 then
    return wrk.format("GET", "/.well-known/matrix/client")
  elseif k < 38 then
    return wrk.format("GET", "/_matrix/client/versions")
  elseif k < 39 then
    return wrk.format("POST", "/_matrix/client/v3/login", json, '{"type":"m.login.password","identifier":{"type":"m.id.user","user":"u"},"password":"p"}')
  else
    return wrk.format("GET", "/_matrix/client/v3/voip/turnServer", auth)
  end
end
