-- Headless Neovim as a real LSP client of `logit-lens serve --stdio`.
-- Environment: LENS_BIN (the binary), LENS_FILE (a text file to open), LENS_OUT (results JSON).
-- Exits 0 when every check passes, 3 otherwise; the Rust test (tests/it/nvim.rs) asserts on
-- the results file too.

local results = { checks = {}, hovers = {} }
local failed = false

local function check(name, ok, detail)
  table.insert(results.checks, { name = name, ok = ok and true or false, detail = detail and tostring(detail) or nil })
  if not ok then failed = true end
end

local function finish()
  local f = io.open(os.getenv('LENS_OUT'), 'w')
  f:write(vim.json.encode(results))
  f:close()
  os.exit(failed and 3 or 0)
end

local ok, err = pcall(function()
  vim.cmd.edit(os.getenv('LENS_FILE'))
  local buf = vim.api.nvim_get_current_buf()
  local client_id = vim.lsp.start({
    name = 'logit-lens',
    cmd = { os.getenv('LENS_BIN'), 'serve', '--stdio' },
    root_dir = vim.fn.getcwd(),
    init_options = { topK = 3, layerStride = 10, inlayHints = true },
  })
  check('client started', client_id ~= nil)
  local attached = vim.wait(120000, function()
    local c = vim.lsp.get_client_by_id(client_id)
    return c ~= nil and c.initialized and vim.lsp.buf_is_attached(buf, client_id)
  end, 50)
  check('client attached', attached)
  local client = vim.lsp.get_client_by_id(client_id)
  results.position_encoding = client.offset_encoding
  check('utf-8 negotiated', client.offset_encoding == 'utf-8', client.offset_encoding)

  local function hover_at(line, col)
    -- (line 0-based, col = byte column, which is the utf-8 character offset)
    local params = {
      textDocument = { uri = vim.uri_from_bufnr(buf) },
      position = { line = line, character = col },
    }
    local res = vim.lsp.buf_request_sync(buf, 'textDocument/hover', params, 120000)
    local r = res and res[client_id]
    if not r then return nil, 'no response' end
    if r.err then return nil, vim.inspect(r.err) end
    return r.result, nil
  end

  -- Line 1 is "Zażółć gęślą jaźń 🦀 日本"; hover the "ę" of gęślą.
  local line = vim.api.nvim_buf_get_lines(buf, 0, 1, false)[1]
  local col = line:find('ęśl', 1, true) - 1
  local h, e = hover_at(0, col)
  check('hover 1 answered', h ~= nil, e)
  if h then
    local md = h.contents.value
    table.insert(results.hovers, { line = 0, col = col, markdown = md, range = h.range })
    check('hover 1 has the table', md:find('| layer | top predictions | p(written) | rank(written) |', 1, true) ~= nil, md)
    check('hover 1 range covers the cursor', h.range.start.character <= col and col < h.range['end'].character, vim.inspect(h.range))
  end

  -- Edit: append a line, then hover on its last word.
  vim.api.nvim_buf_set_lines(buf, -1, -1, false, { 'The capital of France is Paris' })
  local last = vim.api.nvim_buf_line_count(buf) - 1
  local text = vim.api.nvim_buf_get_lines(buf, last, last + 1, false)[1]
  local h2, e2 = hover_at(last, text:find('Paris', 1, true) - 1)
  check('hover 2 answered', h2 ~= nil, e2)
  if h2 then
    local md = h2.contents.value
    table.insert(results.hovers, { line = last, col = text:find('Paris', 1, true) - 1, markdown = md, range = h2.range })
    check('hover 2 shows the edited text', md:find('**␣Paris**', 1, true) == 1, md)
  end

  -- The real hover float.
  vim.api.nvim_win_set_cursor(0, { last + 1, text:find('France', 1, true) - 1 })
  vim.lsp.buf.hover()
  local float_lines
  vim.wait(60000, function()
    for _, w in ipairs(vim.api.nvim_list_wins()) do
      if vim.api.nvim_win_get_config(w).relative ~= '' then
        float_lines = vim.api.nvim_buf_get_lines(vim.api.nvim_win_get_buf(w), 0, -1, false)
        return true
      end
    end
    return false
  end, 50)
  results.float = float_lines
  check('hover float opened', float_lines ~= nil and table.concat(float_lines, '\n'):find('France', 1, true) ~= nil, vim.inspect(float_lines))

  -- A custom method through the client.
  local stats = client:request_sync('lens/cacheStats', {}, 60000, buf)
  check('lens/cacheStats', stats and stats.result and stats.result.misses >= 1, vim.inspect(stats))
  results.cache = stats and stats.result

  -- Inlay hints (opted in via init_options).
  local ih = vim.lsp.buf_request_sync(buf, 'textDocument/inlayHint', {
    textDocument = { uri = vim.uri_from_bufnr(buf) },
    range = { start = { line = 0, character = 0 }, ['end'] = { line = last, character = #text } },
  }, 120000)
  local hints = ih and ih[client_id] and ih[client_id].result
  results.inlay_hints = hints
  check('inlay hints at line ends', hints ~= nil and #hints == last + 1, vim.inspect(ih))
end)
if not ok then check('no Lua error', false, err) end
finish()
