-- wrk script for bench/gateway_load.py: replays a pool of pre-made request bodies and counts
-- only the answers that are 2xx with the expected Content-Type (an error page or a 503 from the
-- overload limit must not pass for throughput).
--
--   wrk ... -s bench/replay.lua URL -- DIR COUNT REQUEST_TYPE EXPECTED_TYPE PATH
--
-- DIR holds the bodies 0.body .. (COUNT-1).body. done() prints one line
--   BENCH_RESULT {json}
-- with the counts, wrk's summary and the whole latency histogram (microseconds -> count), so
-- that several runs can be merged exactly.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   local dir, count = args[1], tonumber(args[2])
   local request_type, path = args[3], args[5]
   expected = args[4]
   pool = {}
   for i = 1, count do
      local file = assert(io.open(dir .. "/" .. (i - 1) .. ".body", "rb"))
      local body = file:read("*a")
      file:close()
      pool[i] = wrk.format("POST", path, {["Content-Type"] = request_type}, body)
   end
   -- Threads start at different places of the pool.
   index = math.random(count)
   good = 0
   bad = 0
   codes = {}
end

function request()
   index = index % #pool + 1
   return pool[index]
end

function response(status, headers, body)
   local content_type = nil
   for name, value in pairs(headers) do
      if string.lower(name) == "content-type" then
         content_type = value
      end
   end
   if status >= 200 and status < 300 and content_type == expected then
      good = good + 1
   else
      bad = bad + 1
      local key = tostring(status) .. " " .. tostring(content_type)
      codes[key] = (codes[key] or 0) + 1
   end
end

local function quote(text)
   return '"' .. string.gsub(text, '[%c"\\]', function(c)
      return string.format("\\u%04x", string.byte(c))
   end) .. '"'
end

function done(summary, latency, requests)
   local total_good, total_bad, bad_kinds = 0, 0, {}
   for _, thread in ipairs(threads) do
      total_good = total_good + thread:get("good")
      total_bad = total_bad + thread:get("bad")
      for key, n in pairs(thread:get("codes")) do
         bad_kinds[key] = (bad_kinds[key] or 0) + n
      end
   end
   local kinds = {}
   for key, n in pairs(bad_kinds) do
      table.insert(kinds, quote(key) .. ":" .. n)
   end
   local histogram = {}
   -- latency(i) is the i-th distinct latency (microseconds) and how many requests took it.
   for i = 1, #latency do
      local value, n = latency(i)
      table.insert(histogram, string.format('"%d":%d', value, n))
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"good":%d,"bad":%d,"bad_kinds":{%s},"requests":%d,"duration_us":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"histogram":{%s}}\n',
      total_good, total_bad, table.concat(kinds, ","), summary.requests, summary.duration,
      e.connect, e.read, e.write, e.status, e.timeout, table.concat(histogram, ",")))
end
