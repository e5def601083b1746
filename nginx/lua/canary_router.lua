-- Blue/green and weighted canary routing for nginx, driven by one shared dict.
--
-- The routing state lives in `ngx.shared.canary` so the admin API can move traffic at
-- runtime: `nginx -s reload` on 1.22 closes idle keep-alive connections and loses requests.
-- Dict keys: "state" (JSON: stable, candidate, weight, shadow, slots{name: host, ports}),
-- "generation" (bumped on every change), "fails:<slot>"/"down:<slot>" (passive health,
-- expiring after fail_timeout), "requests:<slot>"/"shadow:<slot>" (counters).
--
-- Release-safety rules (each one closes a way a bad candidate could reach users):
-- * Forcing a slot (`X-Canary: always|never`, gRPC metadata `x-canary`) is a privilege: it
--   is honoured only with the stack's force token (`X-Canary-Force-Token`) or from an
--   allow-listed network; anyone else is routed as if the header were absent.
-- * A forced request is answered by the slot it forced or fails with a 503 naming that
--   slot: it never fails over, so the gate can never measure stable in the candidate's place.
-- * Passive health counts only transport failures (connect error, reset, timeout: nginx's
--   own 502/504). A slot's 503 (our overload answer, with Retry-After) is passed to the
--   client as it is: it neither marks the slot down nor moves the request.
-- * Unforced traffic fails over to the candidate only while the candidate already has a
--   share of traffic (weight > 0): at 0% it is untested and never a fallback.
-- * An unforced request routed to a slot that has lost its role by the time nginx connects
--   (promote stops the old stable right after the change) goes to the stable slot.
-- * Slots live only on the hosts the rendered config names (`slot_hosts`): the admin API may
--   move a slot to another port, never to another machine, so whoever holds the admin token
--   cannot send clients' requests (and their answers) to a server of their own.
local balancer = require "ngx.balancer"
local json = require "canary_json"

local M = {}
local dict = ngx.shared.canary

-- Set by init() in the master and inherited by the workers it forks, so status tells
-- which rendered config the answering worker runs (a failed reload keeps old workers).
local cfg = { config_generation = -1, max_fails = 3, fail_timeout = 10, token_digest = nil,
              force_digest = nil, slot_hosts = {}, slot_hosts_text = "" }

local SLOT_NAME = "^%l[%l%d_%-]*$"

local function read_file(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local text = f:read("*a")
  f:close()
  return text
end

local function is_int(v, lo, hi)
  return type(v) == "number" and v == math.floor(v) and v >= lo and v <= hi
end

-- validate(doc, known_slots) -> state, or nil and a one-line reason. Used for the routing
-- file at init and for PUT /canary/routing; `doc.slots` may add or move slots.
local function validate(doc, known)
  if type(doc) ~= "table" then return nil, "routing must be a JSON object" end
  local slots = {}
  for name, a in pairs(known) do
    slots[name] = { host = a.host, rest_port = a.rest_port, grpc_port = a.grpc_port,
                    v2_port = a.v2_port or a.rest_port }
  end
  if doc.slots ~= nil and type(doc.slots) ~= "table" then return nil, "slots must be an object" end
  for name, a in pairs(doc.slots or {}) do
    if type(name) ~= "string" or not name:match(SLOT_NAME) then
      return nil, "bad slot name " .. tostring(name)
    end
    if type(a) ~= "table" or type(a.host) ~= "string" or a.host == ""
        or not is_int(a.rest_port, 1, 65535) or not is_int(a.grpc_port, 1, 65535) then
      return nil, "slot " .. name .. " needs host, rest_port and grpc_port (1-65535)"
    end
    if not cfg.slot_hosts[a.host] then
      return nil, "slot " .. name .. ": host " .. a.host .. " is not a slot host of this config ("
        .. cfg.slot_hosts_text .. ")"
    end
    -- v2_port: the Bento's own V2 REST listener (the /v2/ hot path); rest_port when absent
    if a.v2_port ~= nil and not is_int(a.v2_port, 1, 65535) then
      return nil, "slot " .. name .. ": v2_port must be 1-65535 when given"
    end
    slots[name] = { host = a.host, rest_port = a.rest_port, grpc_port = a.grpc_port,
                    v2_port = a.v2_port or a.rest_port }
  end
  local stable, candidate, weight, shadow = doc.stable, doc.candidate, doc.weight, doc.shadow
  if type(stable) ~= "string" or not slots[stable] then
    return nil, "stable must name a known slot, got " .. tostring(stable)
  end
  if candidate ~= nil and (type(candidate) ~= "string" or not slots[candidate]) then
    return nil, "candidate must be null or a known slot, got " .. tostring(candidate)
  end
  if candidate == stable then return nil, "candidate must differ from stable" end
  if not is_int(weight, 0, 100) then
    return nil, "weight must be an integer 0-100, got " .. json.encode(weight)
  end
  if type(shadow) ~= "boolean" then return nil, "shadow must be true or false" end
  if candidate == nil and (weight > 0 or shadow) then
    return nil, "weight above 0 or shadow on needs a candidate"
  end
  return { stable = stable, candidate = candidate, weight = weight, shadow = shadow, slots = slots }
end

-- Each worker decodes the state once per generation, not once per request.
local cached_generation, cached_state = nil, nil
local function state()
  local generation = dict:get("generation")
  if generation ~= cached_generation then
    cached_state, cached_generation = json.decode(dict:get("state")), generation
  end
  return cached_state
end

local function save(new)
  local text = json.encode(new)
  local old_text = dict:get("state")
  if text == old_text then return end
  local old = old_text and json.decode(old_text) or { slots = {} }
  for name, a in pairs(new.slots) do
    local o = old.slots[name]
    -- a slot at a new address is a new process: forget the old one's failures
    if not o or o.host ~= a.host or o.rest_port ~= a.rest_port or o.grpc_port ~= a.grpc_port
        or o.v2_port ~= a.v2_port then
      dict:delete("down:" .. name)
      dict:delete("fails:" .. name)
    end
  end
  local ok, err = dict:set("state", text)
  if not ok then error("cannot store routing state: " .. err, 0) end
  -- bumped after the state is stored, so a worker that sees it reads the new state
  dict:incr("generation", 1, 0)
end

-- init_by_lua (master, at start and on every reload). `text` is JSON rendered by
-- deploy/nginx.py. Errors make `nginx -t` fail, so a bad token or routing file never goes live.
function M.init(text)
  local conf = json.decode(text)
  cfg.config_generation, cfg.max_fails, cfg.fail_timeout =
    conf.config_generation, conf.max_fails, conf.fail_timeout
  cfg.slot_hosts = {}
  for _, host in ipairs(conf.slot_hosts or {}) do cfg.slot_hosts[host] = true end
  cfg.slot_hosts_text = table.concat(conf.slot_hosts or {}, ", ")
  local token, err = read_file(conf.token_file)
  token = token and token:match("^%s*(.-)%s*$")
  if not token or token == "" then error("token file " .. conf.token_file .. " unreadable or empty: " .. tostring(err), 0) end
  cfg.token_digest = ngx.sha1_bin(token)
  cfg.force_digest = nil
  if conf.force_token_file then
    local force = read_file(conf.force_token_file)
    force = force and force:match("^%s*(.-)%s*$")
    if not force or force == "" then error("force token file " .. conf.force_token_file .. " unreadable or empty", 0) end
    cfg.force_digest = ngx.sha1_bin(force)
  end

  -- The routing file is the durable copy (it survives restarts); the dict survives reloads.
  local doc
  local file_text = read_file(conf.routing_file)
  if file_text then
    local ok, parsed = pcall(json.decode, file_text)
    if not ok then error(conf.routing_file .. ": " .. parsed, 0) end
    doc = parsed
  elseif dict:get("state") then
    doc = json.decode(dict:get("state"))
  else
    doc = { stable = conf.default_stable, weight = 0, shadow = false }
  end
  local new, reason = validate(doc, conf.slots)
  if not new then error(conf.routing_file .. ": " .. reason, 0) end
  save(new)
end

function M.init_worker()
  -- workers are forked from one master: seed each differently
  math.randomseed(ngx.now() * 1000 + ngx.worker.pid())
  dict:set("worker:" .. ngx.worker.pid(), cfg.config_generation)
end

-- The config generations of the workers that still take new connections. Each worker
-- records itself at start ("worker:<pid>"); one that is gone, or that the master has told to
-- shut down after a reload, no longer counts: nginx retitles it "worker process is shutting
-- down" in the same step that closes its listeners. A reload is complete, for every new
-- connection, once this is the new generation alone (NginxController.apply waits for it).
-- state, parent pid, and whether the process is gone (ENOENT); nil state and parent when
-- /proc could not be read for another reason (no file descriptor left, hidepid)
local function state_and_parent(pid)
  local f, _, code = io.open("/proc/" .. pid .. "/stat", "rb")
  if not f then return nil, nil, code == 2 end
  local stat = f:read("*a") or ""
  f:close()
  local state, parent = stat:match(".*%) (%a) (%d+)")  -- after the last ")" of the name
  return state, parent, false
end

local function serving_generations()
  local me, master = ngx.worker.pid(), select(2, state_and_parent("self"))
  if not master then return json.null end  -- nobody can tell: apply() waits, then says so
  local seen, list = { [cfg.config_generation] = true }, { cfg.config_generation }
  for _, key in ipairs(dict:get_keys(0)) do
    local pid = key:match("^worker:(%d+)$")
    if pid and tonumber(pid) ~= me then
      local state, parent, gone = state_and_parent(pid)
      if gone or (parent and parent ~= master) or state == "Z" or state == "X" then
        dict:delete(key)  -- exited, or its pid now another process's: forget it
      elseif not (read_file("/proc/" .. pid .. "/cmdline") or ""):find("shutting down", 1, true) then
        -- (a worker whose /proc entry cannot be read now is counted: it may still accept)
        local generation = dict:get(key)
        if generation and not seen[generation] then
          seen[generation] = true
          list[#list + 1] = generation
        end
      end
    end
  end
  table.sort(list)
  return list
end

local function is_down(slot) return dict:get("down:" .. slot) ~= nil end

-- Unforced traffic without a user draws from a shuffled deck of 0..99 per worker: each draw
-- is uniform like math.random, but every 100 draws hit the weight exactly, so the split
-- stays accurate over a few hundred requests.
local deck, dealt = {}, 100
local function draw()
  if dealt == 100 then
    for i = 1, 100 do deck[i] = i - 1 end
    for i = 100, 2, -1 do
      local j = math.random(i)
      deck[i], deck[j] = deck[j], deck[i]
    end
    dealt = 0
  end
  dealt = dealt + 1
  return deck[dealt]
end

-- May this request force a slot? Only with the force token, or from an allow-listed
-- network (`$canary_force_net`, set by the config's geo block).
local function may_force()
  if ngx.var.canary_force_net == "1" then return true end
  local given = ngx.var.http_x_canary_force_token
  -- compare digests: the time taken says nothing about how much of the token matched
  return given ~= nil and cfg.force_digest ~= nil and ngx.sha1_bin(given) == cfg.force_digest
end

-- The slot a failing slot's unforced traffic may move to: the candidate only while it has
-- a share of traffic (at 0% it has not been judged yet), stable always. A slot that lost its
-- role since the request was routed (promote stops the old stable) falls back to stable.
local function fallback(s, slot)
  if slot == s.stable then
    if s.candidate and s.weight > 0 then return s.candidate end
    return nil
  end
  return s.stable
end

-- (slot, forced): the slot that answers this request, and whether a privileged client chose it.
local function choose(s)
  local candidate = s.candidate
  local force = ngx.var.http_x_canary
  if (force == "always" or force == "never") and may_force() then
    if force == "never" then return s.stable, true end
    return candidate, true -- nil when there is no candidate: answered 503 by route()
  end
  if not candidate or s.weight == 0 then return s.stable, false end
  local user = ngx.var.http_x_user_id
  if not user or user == "" then user = ngx.var["cookie_canary-user"] end
  -- crc32 is stable across workers and restarts: a user keeps a slot at a given weight,
  -- and raising the weight only moves more users to the candidate, never back
  local bucket = (user and user ~= "") and ngx.crc32_long(user) % 100 or draw()
  return bucket < s.weight and candidate or s.stable, false
end

local function reply(status, body)
  ngx.status = status
  ngx.header.content_type = "application/json"
  ngx.say(json.encode(body))
end

-- The request id every slot sees (REST header and gRPC metadata `x-request-id`): the
-- client's when it is sane (1-128 of A-Z a-z 0-9 . _ : -, the rule of
-- service/core/request_id.py), else nginx's own 32 hex digits. The slot echoes it and keys
-- its prediction log with it; a mirrored (shadow) copy carries the same id.
local MAX_REQUEST_ID = 128
local function request_id()
  local given = ngx.var.http_x_request_id
  if type(given) == "string" and #given <= MAX_REQUEST_ID and given:match("^[%w%._:%-]+$") then
    return given
  end
  return ngx.var.request_id
end

-- access_by_lua on both public listeners.
function M.route()
  local rid = request_id()
  ngx.req.set_header("X-Request-Id", rid)
  ngx.ctx.request_id = rid
  local s = state()
  local slot, forced = choose(s)
  if not slot then
    ngx.var.canary_slot = "-"
    reply(503, { error = "X-Canary: always, but no candidate is deployed" })
    return ngx.exit(503)
  end
  if not forced and is_down(slot) then
    local other = fallback(s, slot)
    if other and not is_down(other) then slot = other end
  end
  ngx.ctx.slot, ngx.ctx.forced = slot, forced
  -- variables survive the error_page redirect (ngx.ctx does not) and the mirror subrequest
  ngx.var.canary_slot = slot
  ngx.var.canary_forced = forced and "1" or ""
end

local function note_failure(slot)
  local fails = dict:incr("fails:" .. slot, 1, 0, cfg.fail_timeout)
  if fails and fails >= cfg.max_fails then
    dict:set("down:" .. slot, true, cfg.fail_timeout)
  end
end

-- balancer_by_lua; `port_field` is "rest_port", "v2_port" or "grpc_port".
function M.balance(port_field)
  local ctx = ngx.ctx
  local s = state()
  local slot = ctx.slot or s.stable
  local failed, code = balancer.get_last_failure()
  if failed then
    -- proxy_next_upstream/grpc_next_upstream is retrying an unforced request: the last
    -- try failed in transport (log() counts it against the slot)
    ngx.log(ngx.WARN, "canary: slot ", slot, " failed (", failed, " ", tostring(code), "), retrying")
    slot = fallback(s, slot) or slot
    ctx.slot = slot
    ngx.var.canary_slot = slot
  elseif not ctx.shadow and not ctx.forced then
    if slot ~= s.stable and slot ~= s.candidate then
      -- routed (access phase) before a role change, connecting after it: the slot it chose
      -- has no role any more and may be stopping; the stable slot answers instead
      slot = s.stable
      ctx.slot = slot
      ngx.var.canary_slot = slot
    end
    if fallback(s, slot) then balancer.set_more_tries(1) end
  end
  if not ctx.shadow then -- the mirror subrequest shares the main request's variables
    ctx.tried = (ctx.tried and (ctx.tried .. " ") or "") .. slot
    ngx.var.canary_tried = ctx.tried
  end
  local addr = s.slots[slot] or s.slots[s.stable]
  local ok, err = balancer.set_current_peer(addr.host, addr[port_field])
  if not ok then
    ngx.log(ngx.ERR, "canary: cannot route to ", slot, ": ", err)
    return ngx.exit(ngx.ERROR)
  end
end

-- content_by_lua of @canary_unavailable: nginx's own 502/504 (no slot answered) as a clear
-- 503 that names the slot. Upstream answers never come here (proxy_intercept_errors off).
function M.unavailable()
  local slot = ngx.var.canary_slot
  local how = ngx.var.canary_forced == "1" and " (forced by X-Canary: no failover)" or ""
  ngx.header["X-Canary-Slot"] = slot
  reply(503, { error = "slot " .. tostring(slot) .. " did not answer" .. how })
end

-- rewrite_by_lua of the internal shadow location (a mirror subrequest; subrequests skip
-- the access phase). Copies only stable-bound POSTs; otherwise ends before any upstream call.
function M.shadow()
  local s = state()
  local candidate = s.candidate
  if not (s.shadow and candidate) or ngx.req.get_method() ~= "POST"
      or ngx.var.canary_slot ~= s.stable or is_down(candidate) then
    return ngx.exit(ngx.HTTP_NO_CONTENT)
  end
  ngx.ctx.slot, ngx.ctx.shadow = candidate, true
  dict:incr("shadow:" .. candidate, 1, 0)
end

function M.header_filter()
  local slot = ngx.ctx.slot or ngx.var.canary_slot
  if slot and slot ~= "" and slot ~= "-" then ngx.header["X-Canary-Slot"] = slot end
  -- the slot echoes the id itself (gRPC: in trailing metadata); nginx's own answers get it here
  -- (ngx.ctx is gone after the error_page redirect of @canary_unavailable; the header
  -- route() set is not)
  local rid = ngx.ctx.request_id or (slot and slot ~= "" and slot ~= "-" and ngx.var.http_x_request_id)
  if rid and not ngx.header["X-Request-Id"] and ngx.header.content_type ~= "application/grpc" then
    ngx.header["X-Request-Id"] = rid
  end
end

-- log_by_lua: count the request, and every transport failure against the slot it hit.
-- $upstream_status lists one status per try ("502, 200"); $canary_tried the slots tried.
function M.log()
  local slot = ngx.ctx.slot or ngx.var.canary_slot
  if slot and slot ~= "" and slot ~= "-" then dict:incr("requests:" .. slot, 1, 0) end
  local tried = ngx.var.canary_tried
  if not tried or tried == "" then return end
  local statuses = {}
  for status in (ngx.var.upstream_status or ""):gmatch("[^,%s]+") do statuses[#statuses + 1] = status end
  local i = 0
  for name in tried:gmatch("%S+") do
    i = i + 1
    -- 502: connect error or reset; 504: timeout (our slots never answer these themselves)
    if statuses[i] == "502" or statuses[i] == "504" then note_failure(name) end
  end
end

local function status_table()
  local s = state()
  local slots = {}
  for name, a in pairs(s.slots) do
    slots[name] = {
      host = a.host, rest_port = a.rest_port, grpc_port = a.grpc_port, v2_port = a.v2_port,
      down = is_down(name), down_for_s = dict:ttl("down:" .. name) or 0,
      recent_failures = dict:get("fails:" .. name) or 0,
      requests = dict:get("requests:" .. name) or 0,
      shadow_requests = dict:get("shadow:" .. name) or 0,
    }
  end
  return {
    stable = s.stable, candidate = s.candidate or json.null, weight = s.weight, shadow = s.shadow,
    slots = slots, generation = dict:get("generation"),
    config_generation = cfg.config_generation, worker_pid = ngx.worker.pid(),
    serving_generations = serving_generations(),
    max_fails = cfg.max_fails, fail_timeout_s = cfg.fail_timeout,
  }
end

local function authorized()
  local given = ngx.var.http_x_canary_token
  -- compare digests: the time taken says nothing about how much of the token matched
  return given ~= nil and ngx.sha1_bin(given) == cfg.token_digest
end

-- content_by_lua of GET /canary/status on the loopback admin listener.
function M.admin_status()
  if not authorized() then return reply(401, { error = "missing or wrong X-Canary-Token" }) end
  if ngx.req.get_method() ~= "GET" then return reply(405, { error = "use GET" }) end
  reply(200, status_table())
end

-- content_by_lua of PUT /canary/routing: validate, store, answer the new status.
function M.admin_routing()
  if not authorized() then return reply(401, { error = "missing or wrong X-Canary-Token" }) end
  if ngx.req.get_method() ~= "PUT" then return reply(405, { error = "use PUT" }) end
  ngx.req.read_body()
  local ok, doc = pcall(json.decode, ngx.req.get_body_data())
  if not ok then return reply(400, { error = doc }) end
  local new, reason = validate(doc, state().slots)
  if not new then return reply(400, { error = reason }) end
  save(new)
  reply(200, status_table())
end

-- content_by_lua of GET /metrics on the loopback admin listener: the router's view in the
-- Prometheus text format (read-only, so no token: Prometheus scrapes it from this machine).
function M.admin_metrics()
  local t = status_table()
  local lines = {
    "# HELP canary_router_weight Share of unforced traffic the router sends to each slot (0-100).",
    "# TYPE canary_router_weight gauge",
  }
  local function add(fmt, ...) lines[#lines + 1] = string.format(fmt, ...) end
  for name, slot in pairs(t.slots) do
    local share = 0
    if name == t.stable then share = (t.candidate ~= json.null) and (100 - t.weight) or 100
    elseif name == t.candidate then share = t.weight end
    add('canary_router_weight{slot="%s"} %d', name, share)
  end
  add("# HELP canary_router_requests_total Requests the router sent to each slot since nginx started.")
  add("# TYPE canary_router_requests_total counter")
  for name, slot in pairs(t.slots) do add('canary_router_requests_total{slot="%s"} %d', name, slot.requests) end
  add("# HELP canary_router_slot_down 1 while passive health keeps a slot out of rotation.")
  add("# TYPE canary_router_slot_down gauge")
  for name, slot in pairs(t.slots) do add('canary_router_slot_down{slot="%s"} %d', name, slot.down and 1 or 0) end
  ngx.header.content_type = "text/plain; version=0.0.4"
  ngx.say(table.concat(lines, "\n"))
end

return M
