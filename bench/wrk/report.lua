-- wrk script for bench/run.py: optional POST body, optional per-response
-- check, and a one-line JSON report at the end.
--
-- Environment:
--   BENCH_BODY_FILE     send POST with this file's content as the body
--   BENCH_EXPECT_LENGTH check every response is 200 with a body of exactly
--                       this many bytes (notary answers are deterministic)

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

local body_file = os.getenv("BENCH_BODY_FILE")
if body_file and body_file ~= "" then
  local f = assert(io.open(body_file, "rb"))
  wrk.method = "POST"
  wrk.body = f:read("*a")
  f:close()
  wrk.headers["Content-Type"] = "application/json"
end

local expect = tonumber(os.getenv("BENCH_EXPECT_LENGTH") or "")

function init(args)
  good = 0
  bad = 0
  bad_status = 0
end

if expect then
  function response(status, headers, body)
    if status ~= 200 then
      bad_status = bad_status + 1
      bad = bad + 1
    elseif #body ~= expect then
      bad = bad + 1
    else
      good = good + 1
    end
  end
end

function done(summary, latency, requests)
  local g, b, s = 0, 0, 0
  for _, t in ipairs(threads) do
    g = g + (t:get("good") or 0)
    b = b + (t:get("bad") or 0)
    s = s + (t:get("bad_status") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p99":%d,"max":%d},' ..
    '"checked":%s,"good":%d,"bad":%d,"bad_status":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max,
    expect and "true" or "false", g, b, s))
end
