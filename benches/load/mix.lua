-- A Synapse-like request mix for wrk: room messages and sends over many
-- rooms, sync with many users' tokens, media, and a little else.
-- Counts non-2xx answers across threads and prints one JSON summary line.

local counter = 0
local threads = {}
-- A global, so done() can read it from each thread with thread:get().
bad = 0

local b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local function user(n)
  -- A syt_ token carries the base64 of the localpart; any letters do here.
  local s, v = "", n + 4096
  while v > 0 do
    local i = v % 64
    s = s .. b64:sub(i + 1, i + 1)
    v = math.floor(v / 64)
  end
  return s
end

function setup(thread)
  table.insert(threads, thread)
end

function request()
  counter = counter + 1
  local k = counter % 10
  local room = string.format("%%21room%d%%3Abench.example", (counter * 7919) % 2000)
  if k < 3 then
    return wrk.format("GET", "/_matrix/client/v3/rooms/" .. room .. "/messages?dir=b&limit=10")
  elseif k < 5 then
    return wrk.format("PUT", "/_matrix/client/v3/rooms/" .. room .. "/send/m.room.message/t" .. counter,
      {["Content-Type"] = "application/json"}, '{"msgtype":"m.text","body":"hello"}')
  elseif k < 8 then
    return wrk.format("GET", "/_matrix/client/v3/sync?since=s" .. counter .. "_1&timeout=0&access_token=syt_"
      .. user(counter % 500) .. "_aBcDeFgHiJkLmNoPqRsT_1a2b3c")
  elseif k < 9 then
    return wrk.format("GET", "/_matrix/client/v1/media/download/bench.example/m" .. (counter % 100))
  else
    return wrk.format("GET", "/_matrix/client/versions")
  end
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    bad = bad + 1
  end
end

function done(summary, latency, requests)
  local non2xx = 0
  for _, t in ipairs(threads) do
    non2xx = non2xx + (t:get("bad") or 0)
  end
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "non2xx": %d, "errors": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "p999_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, non2xx,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status + summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9), latency.max))
end
