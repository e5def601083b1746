-- A small JSON codec for the router's own documents (routing file, admin API bodies).
-- Debian's libnginx-mod-http-lua ships without cjson; the router only handles small
-- objects, so a few dozen lines here beat one more system package to install.
-- JSON null decodes to nil (an absent key); encode `M.null` to write an explicit null.
local M = {}
M.null = setmetatable({}, { __tostring = function() return "null" end })

local MAX_DEPTH = 16 -- admin bodies are tiny: deep nesting is an attack, not a routing

local escape = { ['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f",
                 ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t" }

local function encode_value(v, out)
  local kind = type(v)
  if v == nil or v == M.null then
    out[#out + 1] = "null"
  elseif kind == "boolean" then
    out[#out + 1] = tostring(v)
  elseif kind == "number" then
    if v ~= v or v == math.huge or v == -math.huge then error("cannot encode " .. tostring(v)) end
    out[#out + 1] = (math.floor(v) == v and math.abs(v) < 2 ^ 53) and string.format("%d", v)
                    or string.format("%.17g", v)
  elseif kind == "string" then
    out[#out + 1] = '"' .. (v:gsub('[%c"\\]', function(c)
      return escape[c] or string.format("\\u%04x", c:byte())
    end)) .. '"'
  elseif kind == "table" and #v > 0 then
    out[#out + 1] = "["
    for i, item in ipairs(v) do
      if i > 1 then out[#out + 1] = "," end
      encode_value(item, out)
    end
    out[#out + 1] = "]"
  elseif kind == "table" then
    local keys = {}
    for k in pairs(v) do keys[#keys + 1] = tostring(k) end
    table.sort(keys) -- stable output: equal states encode to equal strings
    out[#out + 1] = "{"
    for i, k in ipairs(keys) do
      if i > 1 then out[#out + 1] = "," end
      encode_value(k, out)
      out[#out + 1] = ":"
      encode_value(v[k], out)
    end
    out[#out + 1] = "}"
  else
    error("cannot encode a " .. kind)
  end
end

function M.encode(v)
  local out = {}
  encode_value(v, out)
  return table.concat(out)
end

local function fail(i, msg) error(string.format("invalid JSON at byte %d: %s", i, msg), 0) end

local function skip(s, i) return s:find("[^ \t\r\n]", i) or #s + 1 end

local function utf8_char(cp)
  if cp < 0x80 then return string.char(cp) end
  if cp < 0x800 then return string.char(0xC0 + math.floor(cp / 64), 0x80 + cp % 64) end
  return string.char(0xE0 + math.floor(cp / 4096), 0x80 + math.floor(cp / 64) % 64, 0x80 + cp % 64)
end

local unescape = { b = "\b", f = "\f", n = "\n", r = "\r", t = "\t", ['"'] = '"', ["\\"] = "\\", ["/"] = "/" }

local function parse_string(s, i) -- s[i] is the opening quote
  local out, j = {}, i + 1
  while true do
    local k = s:find('["\\%c]', j)
    if not k then fail(i, "unterminated string") end
    out[#out + 1] = s:sub(j, k - 1)
    local c = s:sub(k, k)
    if c == '"' then return table.concat(out), k + 1 end
    if c ~= "\\" then fail(k, "control character in string") end
    local e = s:sub(k + 1, k + 1)
    if e == "u" then
      local hex = s:sub(k + 2, k + 5)
      if not hex:match("^%x%x%x%x$") then fail(k, "bad \\u escape") end
      out[#out + 1], j = utf8_char(tonumber(hex, 16)), k + 6
    elseif unescape[e] then
      out[#out + 1], j = unescape[e], k + 2
    else
      fail(k, "bad escape")
    end
  end
end

local parse_value

local function parse_container(s, i, depth, close)
  if depth > MAX_DEPTH then fail(i, "nested too deeply") end
  local result, n = {}, 0
  i = skip(s, i + 1)
  if s:sub(i, i) == close then return result, i + 1 end
  while true do
    local key
    if close == "}" then
      if s:sub(i, i) ~= '"' then fail(i, "expected a string key") end
      key, i = parse_string(s, i)
      i = skip(s, i)
      if s:sub(i, i) ~= ":" then fail(i, "expected ':'") end
      i = skip(s, i + 1)
    else
      n = n + 1
      key = n
    end
    result[key], i = parse_value(s, i, depth + 1)
    i = skip(s, i)
    local c = s:sub(i, i)
    if c == close then return result, i + 1 end
    if c ~= "," then fail(i, "expected ',' or '" .. close .. "'") end
    i = skip(s, i + 1)
  end
end

local literals = { ["true"] = true, ["false"] = false }

parse_value = function(s, i, depth)
  local c = s:sub(i, i)
  if c == "{" then return parse_container(s, i, depth, "}") end
  if c == "[" then return parse_container(s, i, depth, "]") end
  if c == '"' then return parse_string(s, i) end
  local word = s:match("^%a+", i)
  if word == "null" then return nil, i + 4 end
  if literals[word] ~= nil then return literals[word], i + #word end
  local num = s:match("^-?%d+%.?%d*[eE]?[-+]?%d*", i)
  if num and tonumber(num) then return tonumber(num), i + #num end
  fail(i, "unexpected character")
end

-- decode(text) -> value, or raises "invalid JSON at byte N: why".
function M.decode(s)
  if type(s) ~= "string" then error("invalid JSON: no text", 0) end
  local value, i = parse_value(s, skip(s, 1), 1)
  if skip(s, i) <= #s then fail(i, "trailing characters") end
  return value
end

return M
