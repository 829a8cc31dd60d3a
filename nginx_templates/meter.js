// Bastion's token meter (njs 0.7+): header and body filters on the pool locations, and the variables the
// access log prints (outcome, prompt/completion/total tokens). Every chunk goes on to the client as soon as
// it arrives, untouched, except when the gate asked nginx to add stream_options.include_usage for a client
// that did not ask (X-Bastion-Usage, authsvc/include_usage.py): then the usage event the upstream adds for it, and
// the "usage":null it may add to every chunk, are taken out again, whole events at a time, so the client gets
// exactly the stream it would have got without Bastion. See docs/operations.md, "Token metering".
// For a model alias (X-Bastion-Public-Model, authsvc/aliases.py) the top-level "model" of the answer (the JSON
// body, each SSE event, each NDJSON line) is set to the public name the client asked for; nothing else changes.
//
// njs gives each request its own copy of these globals: they are the request's state. The hot path (every
// chunk of a stream) finds line ends with single-byte searches, looks at the last bytes of each line and
// searches each chunk once for "usage"; only a line holding a usage object or Ollama's last line is decoded
// and parsed.

var JSON_KEEP = 1048576; // of a JSON answer longer than this only the last JSON_KEEP bytes are read
var LINE_KEEP = 1048576; // a line longer than this is not pieced together (it cannot be a usage line)
var HOLD_KEEP = 65536; // strip mode: an unfinished event longer than this goes on as it is
var TAIL_SCAN = 16384; // json: the bytes after a usage object that are scanned to see that it is top-level
var USAGE_TRIES = 4; // json: usage objects looked at, from the end (each may cost a TAIL_SCAN byte loop)
// Needles are strings, not Buffers: njs runs this top-level code again for every request (njs_vm_start).
var USAGE = '"usage"';
var PROMPT_TOKENS = '"prompt_tokens"';
var COMPLETION_TOKENS = '"completion_tokens"';
var TOTAL_TOKENS = '"total_tokens"';
var INPUT_TOKENS = '"input_tokens"'; // the Responses API's (and Anthropic's) names
var OUTPUT_TOKENS = '"output_tokens"';
var PROMPT_EVAL_COUNT = '"prompt_eval_count"';
var EVAL_COUNT = '"eval_count"';
var DONE = "[DONE]";
var MODEL = '"model"';
var RESPONSE = '"response"';
var DONE_TRUE = '"done":true';
var DONE_TRUE_SPACED = '"done": true';
// What njs allocates for a request stays until the request ends (njs 0.7 frees nothing before): the hot path
// allocates as little as it can per chunk (no object literal, no slice of a whole Buffer). A stream still costs
// nginx about half a KiB per chunk for njs's own Buffer and flags objects (docs/benchmarks.md).
var FLUSH = {last: false, flush: true};

var seen = false; // the upstream's answer reached the header filter
var ended = false; // its last byte went on (the body filter saw the last buffer)
var kind = ""; // "sse", "ndjson", "json" or "" (anything else: only its end is watched)
var ollamaApi = false; // Ollama's own API (/api/...): its counts, never a "usage" object
var strip = false; // take out what the injected include_usage added
var finished = false; // the format's own end mark: data: [DONE], "done":true, or a whole JSON body
var needsMark = false; // this answer must end with its mark (chat and completion streams)
var rest = []; // bytes after the last newline (strip mode: after the last complete event), not yet read
var restSize = 0;
var dropping = false; // strip mode: inside the injected usage event
var nextUsage = -1; // the next "usage" in the Buffer being scanned (its length: none), -1: not searched yet
var parts = []; // json: the body so far (its tail past JSON_KEEP)
var size = 0;
var lastAt = 0; // ms: the last bytes from the upstream
var req = null; // the request, to set the token variables (js_var) once they are known
var rename = null; // a model alias: the public name as a JSON string Buffer (the answer's "model" becomes it)
var partial = false; // rename: the bytes sent last ended inside a line (the next line start is not one)
var jsonState = null; // rename of a JSON answer: the scanner's state until the top-level "model" is found
var jsonHeld = null; // its bytes not yet sent (a top-level string cut by the end of a chunk)
var NAME_KEEP = 256; // rename: a top-level string cut longer than this cannot be the key "model": not held
var nested = false; // rename: the Responses API's events, whose model is "response":{"model":...}

function header(r) {
    req = r;
    seen = true;
    lastAt = Date.now();
    if (r.method === "HEAD" || r.status === 204 || r.status === 304) {
        ended = true; // no body follows
        return;
    }
    var type = (r.headersOut["Content-Type"] || "").toLowerCase();
    var alias = r.variables.bastion_public_model;
    if (alias && r.status === 200) {
        rename = Buffer.from(JSON.stringify(alias));
        delete r.headersOut["Content-Length"]; // the public name may be longer or shorter
    }
    if (type.indexOf("text/event-stream") === 0) {
        kind = "sse";
        nested = r.uri === "/v1/responses";
        needsMark = r.uri === "/v1/chat/completions" || r.uri === "/v1/completions"; // (a regex costs µs)
        strip = Boolean(r.variables.bastion_usage_insert) && r.status === 200;
        if (strip) {
            delete r.headersOut["Content-Length"]; // events may be taken out
        }
    } else if (type.indexOf("application/x-ndjson") === 0) {
        kind = "ndjson";
        needsMark = r.uri === "/api/chat" || r.uri === "/api/generate";
    } else if (type.indexOf("application/json") === 0) {
        kind = "json";
        ollamaApi = r.uri.indexOf("/api/") === 0;
    }
}

function body(r, data, flags) {
    if (data.length) {
        lastAt = Date.now();
    }
    if (kind === "sse" || kind === "ndjson") {
        stream(r, data, flags);
    } else {
        if (rename && kind === "json" && jsonState !== false) {
            renameJson(r, data, flags);
        } else {
            r.sendBuffer(data, flags);
        }
        if (kind === "json") {
            keep(data);
        }
    }
    if (flags.last) {
        ended = true;
        if (kind === "json") {
            readJson();
        }
    }
}

// A stream: its complete lines are looked at (the bytes after them wait for the next chunk; a newline byte
// never occurs inside a multibyte character, so a line is always whole UTF-8). Passed on at once untouched,
// or in strip mode up to its last complete event, without what include_usage added.
function stream(r, data, flags) {
    var holding = strip || rename !== null; // lines (events) go on once complete, maybe changed
    if (!holding) {
        r.sendBuffer(data, flags); // first: the client never waits for the meter
    }
    var buf = restSize ? held(data) : data;
    var end = flags.last ? buf.length : boundary(buf);
    if (holding && buf.length - end > HOLD_KEEP) {
        end = buf.length; // no event ends: let it through rather than hold the stream back
    }
    if (end < buf.length && !hold(buf.slice(end)) && holding) {
        end = buf.length;
    }
    var out = scan(buf, end);
    if (holding) {
        var events = out !== null ? (out.length === 1 ? out[0] : Buffer.concat(out))
            : end === buf.length ? buf : buf.slice(0, end);
        if (events.length || flags.last) {
            r.sendBuffer(events, flags.last ? flags : FLUSH);
        }
        if (end > 0) {
            partial = buf[end - 1] !== 10;
        }
    }
}

// Where the complete part of `buf` ends: after its last newline, in strip mode after its last blank line.
function boundary(buf) {
    var nl = buf.lastIndexOf(10);
    if (!strip) {
        return nl + 1;
    }
    while (nl > 0) {
        if (buf[nl - 1] === 10 || (buf[nl - 1] === 13 && nl > 1 && buf[nl - 2] === 10)) {
            return nl + 1;
        }
        nl = buf.lastIndexOf(10, nl - 1);
    }
    return 0;
}

function hold(buf) {
    if (restSize + buf.length > LINE_KEEP) {
        rest = [];
        restSize = 0;
        return false;
    }
    rest.push(buf);
    restSize += buf.length;
    return true;
}

function held(buf) {
    var all = Buffer.concat(rest.concat([buf]));
    rest = [];
    restSize = 0;
    return all;
}

// The lines of buf[0, end): null when all stay as they are, else the Buffers to send instead.
function scan(buf, end) {
    var out = null;
    var kept = 0;
    nextUsage = -1;
    var start = 0;
    while (start < end) {
        var nl = buf.indexOf(10, start);
        var stop = nl === -1 || nl >= end ? end : nl + 1;
        var verdict = kind === "sse" ? sseLine(buf, start, stop) : ndjsonLine(buf, start, stop);
        if (rename !== null && verdict !== null && !(partial && start === 0)) {
            var renamed = verdict === true ? renameLine(buf, start, stop) : renameLine(verdict, 0, verdict.length);
            if (renamed !== null) {
                verdict = renamed;
            }
        }
        if (verdict !== true) {
            out = out || [];
            if (start > kept) {
                out.push(buf.slice(kept, start));
            }
            if (verdict) {
                out.push(verdict);
            }
            kept = stop;
        }
        start = stop;
    }
    if (out !== null && kept < end) {
        out.push(buf.slice(kept, end));
    }
    return out;
}

// Where the content of the line buf[start, stop) ends (before its \n or \r\n).
function contentEnd(buf, start, stop) {
    if (stop > start && buf[stop - 1] === 10) {
        stop--;
    }
    if (stop > start && buf[stop - 1] === 13) {
        stop--;
    }
    return stop;
}

// One SSE line: true to keep it, null to drop it, or the Buffer to send instead. A `data:` line ending in `}`
// is looked at only when it holds a `"usage"` (found for the whole chunk at once: `nextUsage`), wherever that
// key is: OpenAI writes `"obfuscation":"<padding>"` after it in every chunk since 2025.
function sseLine(buf, start, stop) {
    var end = contentEnd(buf, start, stop);
    if (dropping) {
        dropping = end !== start; // the injected usage event, up to its blank line
        return null;
    }
    if (end - start < 7 || buf[start] !== 100 || buf[start + 1] !== 97) { // "da(ta:)"
        return true;
    }
    var last = buf[end - 1];
    if (last === 93) { // "]": data: [DONE]
        if (end - start <= 16 && buf.slice(start + 5, end).toString().trim() === "[DONE]") {
            finished = true;
        }
        return true;
    }
    if (last !== 125 || end - start < 20) {
        return true;
    }
    if (nextUsage < start) {
        nextUsage = found(buf, start);
    }
    if (nextUsage >= end) {
        return true;
    }
    // the event's own usage is its last "usage" key (model text is in JSON strings, where quotes are escaped;
    // a "usage" not followed by `:` is a string value, e.g. a logprob's token)
    var at = -1;
    var value = -1;
    do {
        var v = valueAt(buf, nextUsage + USAGE.length, end);
        if (v !== -1) {
            at = nextUsage;
            value = v;
        }
        nextUsage = found(buf, nextUsage + USAGE.length);
    } while (nextUsage < end);
    if (value === -1) {
        return true;
    }
    if (buf[value] === 110) { // "n": "usage":null, what include_usage adds to every chunk
        return strip && buf[value + 3] === 108 ? withoutNullUsage(buf, start, at, value + 4, end, stop) : true;
    }
    if (buf[value] !== 123) { // "{"
        return true;
    }
    var event = parse(buf.slice(start + 5, end).toString()); // one event a stream (vLLM's continuous stats: each)
    if (!event) {
        return true;
    }
    if (!event.usage && event.response && typeof event.response === "object" && event.response.usage
            && typeof event.response.usage === "object") {
        // the Responses API: its last event (response.completed, .incomplete or .failed) carries the response
        // with its usage, and no [DONE] follows
        openai(event.response.usage);
        finished = true;
        return true;
    }
    if (!event.usage || typeof event.usage !== "object") {
        return true;
    }
    openai(event.usage);
    if (strip && Array.isArray(event.choices) && event.choices.length === 0) {
        dropping = true;
        return null;
    }
    return true;
}

// The next "usage" in buf from `from` on, or buf.length.
function found(buf, from) {
    var i = buf.indexOf(USAGE, from);
    return i === -1 ? buf.length : i;
}

// Where the value of the key ending just before `i` starts (after `:` and spaces), or -1 when `i` is not a key.
function valueAt(buf, i, end) {
    while (i < end && buf[i] === 32) {
        i++;
    }
    if (buf[i] !== 58) { // ":"
        return -1;
    }
    i++;
    while (i < end && buf[i] === 32) {
        i++;
    }
    return i < end ? i : -1;
}

// The line without `"usage":null` (the key at `at`, the value ending at `after`) and the comma before it.
function withoutNullUsage(buf, start, at, after, end, stop) {
    var cut = at - 1;
    while (cut > start && buf[cut] === 32) {
        cut--;
    }
    if (buf[cut] !== 44) { // ",": the first key of its object (no one sends that), left as it is
        return true;
    }
    return Buffer.concat([buf.slice(start, cut), buf.slice(after, stop)]);
}

// One NDJSON line: Ollama's last one says "done":true (its other lines end with "done":false}).
function ndjsonLine(buf, start, stop) {
    var end = contentEnd(buf, start, stop);
    if (end - start < 8 || (buf[end - 2] === 101 && buf[end - 3] === 115)) { // "se}": false}
        return true;
    }
    var window = buf.slice(Math.max(start, end - 1024), end);
    if (window.indexOf(DONE_TRUE) !== -1 || window.indexOf(DONE_TRUE_SPACED) !== -1) {
        ollama(parse(buf.slice(start, end).toString()), true);
    }
    return true;
}

function keep(data) {
    parts.push(data);
    size += data.length;
    while (size - parts[0].length >= JSON_KEEP) {
        size -= parts[0].length;
        parts.shift();
    }
}

// The counts of a JSON answer, read from its bytes: no decoding and no JSON.parse, which in a request's fresh
// VM costs more than everything else the meter does. The format is the request's, never the body's: Ollama's
// /api/ answers can hold the model's output as JSON (tool-call arguments are objects there), so a usage object
// in them can be forged by whoever writes the tool's schema.
function readJson() {
    var buf = parts.length === 1 ? parts[0] : Buffer.concat(parts);
    parts = [];
    finished = true;
    if (ollamaApi) {
        // Ollama writes its counts last, after the message: a key that is followed by a `}` or `]` before the
        // body's own last `}` is inside some object (the model's) and is not counted
        var close = buf.lastIndexOf(125);
        var p = integer(buf, PROMPT_EVAL_COUNT, flatUntil(buf, buf.lastIndexOf(PROMPT_EVAL_COUNT), close));
        var c = integer(buf, EVAL_COUNT, flatUntil(buf, buf.lastIndexOf(EVAL_COUNT), close));
        if (p !== "" || c !== "") {
            tokens(p || "0", c || "0", String(Number(p || "0") + Number(c || "0")));
        }
        return;
    }
    // OpenAI and the servers that copy it: the top-level "usage" object. Everything the model wrote is inside
    // JSON strings there (content and tool-call arguments alike), where a quote is written \" ; a `"usage"`
    // followed by `:` and `{` is therefore a key the server wrote (a quote preceded by a letter cannot be an
    // escaped one, and a string followed by `:` is a key). Servers write it after the choices, and only some
    // (vLLM's prompt_logprobs) write more after it: the last one whose object closes the body's own is taken;
    // past TAIL_SCAN bytes of tail that cannot be checked, and then only the body's last usage object counts.
    var at = buf.length;
    var fallback = null;
    var tries = USAGE_TRIES;
    while ((at = at > 0 ? buf.lastIndexOf(USAGE, at - 1) : -1) !== -1) {
        var open = valueAt(buf, at + USAGE.length, buf.length);
        if (open === -1 || buf[open] !== 123) {
            continue; // "usage" as a value (a token's text) or not an object
        }
        if (!tries--) {
            break;
        }
        var shut = objectEnd(buf, open);
        if (shut === -1) {
            continue;
        }
        var top = closesBody(buf, shut + 1);
        if (top === false) {
            continue; // inside another object: not the answer's
        }
        var counts = usageCounts(buf, open, shut);
        if (top === true) {
            if (counts) {
                tokens(counts[0], counts[1], counts[2]);
            }
            return;
        }
        if (tries === USAGE_TRIES - 1) {
            fallback = counts; // only the last usage object in the body may count without that proof
        }
    }
    if (fallback) {
        tokens(fallback[0], fallback[1], fallback[2]);
    }
}

// `from` when buf(from, close) holds no `}` or `]` (nothing after it closes an object or array), else -1.
function flatUntil(buf, from, close) {
    if (from < 0 || close <= from) {
        return -1;
    }
    var tail = buf.slice(from, close);
    return tail.indexOf(125) === -1 && tail.indexOf(93) === -1 ? from : -1;
}

// The index of the `}` closing the object opened at `open`, or -1. Strings are not skipped: this is an object
// the server wrote (see readJson), holding keys and numbers.
function objectEnd(buf, open) {
    var depth = 1;
    var i = open + 1;
    var nextOpen = buf.indexOf(123, i);
    for (;;) {
        var close = buf.indexOf(125, i);
        if (close === -1) {
            return -1;
        }
        if (nextOpen !== -1 && nextOpen < close) {
            depth++;
            i = nextOpen + 1;
            nextOpen = buf.indexOf(123, i);
        } else if (--depth === 0) {
            return close;
        } else {
            i = close + 1;
        }
    }
}

// The index of the quote closing the string opened at `i`, or -1.
function stringEnd(buf, i) {
    for (;;) {
        i = buf.indexOf(34, i + 1);
        if (i === -1) {
            return -1;
        }
        var slashes = 0;
        while (buf[i - 1 - slashes] === 92) {
            slashes++;
        }
        if (slashes % 2 === 0) {
            return i;
        }
    }
}

// Whether what follows a value at `from` closes the body's top-level object: true, false (it closes a nested
// one first), or null when the tail is longer than TAIL_SCAN (not scanned: byte loops cost in njs).
function closesBody(buf, from) {
    var close = buf.lastIndexOf(125);
    if (flatUntil(buf, from, close) === from && blank(buf, close + 1)) {
        return true; // the usual tail: a few keys with strings or numbers (no brackets at all), then the end
    }
    if (buf.length - from > TAIL_SCAN) {
        return null;
    }
    var depth = 0;
    for (var i = from; i < buf.length; i++) {
        var b = buf[i];
        if (b === 34) {
            i = stringEnd(buf, i);
            if (i === -1) {
                return false;
            }
        } else if (b === 123 || b === 91) {
            depth++;
        } else if (b === 125 || b === 93) {
            if (--depth < 0) {
                return b === 125 && blank(buf, i + 1);
            }
        }
    }
    return false;
}

// Whether buf holds only whitespace from `i` on.
function blank(buf, i) {
    while (i < buf.length && (buf[i] === 32 || buf[i] === 10 || buf[i] === 13 || buf[i] === 9)) {
        i++;
    }
    return i === buf.length;
}

// [prompt, completion, total] of the usage object buf[open, shut], or null when it has none.
function usageCounts(buf, open, shut) {
    var usage = buf.slice(open, shut + 1);
    var prompt = integer(usage, PROMPT_TOKENS, 0) || integer(usage, INPUT_TOKENS, 0);
    var completion = integer(usage, COMPLETION_TOKENS, 0) || integer(usage, OUTPUT_TOKENS, 0);
    var total = integer(usage, TOTAL_TOKENS, 0);
    if (total === "" && prompt !== "" && completion !== "") {
        total = String(Number(prompt) + Number(completion));
    }
    return prompt !== "" || completion !== "" || total !== "" ? [prompt, completion, total] : null;
}

// The integer value of the first key `name` (a Buffer of `"name"`) at or after `from`, or "".
function integer(buf, name, from) {
    var i = from < 0 ? -1 : buf.indexOf(name, from);
    if (i === -1) {
        return "";
    }
    i += name.length;
    while (buf[i] === 32) {
        i++;
    }
    if (buf[i] !== 58) { // ":"
        return "";
    }
    i++;
    while (buf[i] === 32) {
        i++;
    }
    var start = i;
    var n = 0;
    while (buf[i] >= 48 && buf[i] <= 57) {
        n = n * 10 + buf[i] - 48; // (a Buffer's toString costs ~1 µs, even for one digit)
        i++;
    }
    var next = buf[i];
    if (i === start || i - start > 15 || (next !== 44 && next !== 125 && next !== 32 && next !== 10 && next !== 13)) {
        return ""; // not a plain integer (a fraction, an exponent, a string)
    }
    return String(n);
}

function parse(text) {
    try {
        return JSON.parse(text);
    } catch (e) {
        return null;
    }
}

function count(value) {
    return typeof value === "number" && value >= 0 && value % 1 === 0 && value < 1e15 ? String(value) : "";
}

function openai(usage) {
    var prompt = count(usage.prompt_tokens !== undefined ? usage.prompt_tokens : usage.input_tokens);
    var completion = count(usage.completion_tokens !== undefined ? usage.completion_tokens : usage.output_tokens);
    var total = count(usage.total_tokens);
    if (total === "" && prompt !== "" && completion !== "") {
        total = String(Number(prompt) + Number(completion));
    }
    tokens(prompt, completion, total);
}

// Ollama omits a count that is zero (Go's omitempty): with either count present, a missing one is 0.
function ollama(doc, stream) {
    if (!doc || typeof doc !== "object") {
        return;
    }
    if (stream) {
        if (doc.done !== true) {
            return;
        }
        finished = true;
    }
    var p = count(doc.prompt_eval_count);
    var c = count(doc.eval_count);
    if (p === "" && c === "") {
        return;
    }
    tokens(p || "0", c || "0", String(Number(p || "0") + Number(c || "0")));
}

// The outcome, read when the access log line is written.
function outcome(r) {
    var v = r.variables;
    if (!v.bastion_pool) {
        return ""; // not proxied: the gate answered
    }
    if (!seen) { // no answer from the upstream reached the client (nginx's own error page instead)
        var status = Number(v.status);
        return status === 504 ? "timeout" : status === 499 ? "client_cut" : status >= 500 ? "upstream_cut" : "completed";
    }
    // the end mark ([DONE], done: true, the last event) went to the client: whole, even if the client closed
    // before nginx passed on the upstream's last (empty) buffer
    if (finished) {
        return "completed";
    }
    if (ended) {
        return needsMark ? "upstream_cut" : "completed";
    }
    // cut before its end: nginx finishes the request normally after an upstream error, but terminates it when
    // the client went away (or was too slow to read)
    if (v.request_completion !== "OK") {
        return "client_cut";
    }
    // proxy_read_timeout: silence for that long (nginx re-arms its timer lazily: it may fire up to 300 ms early)
    var timeout = Number(v.bastion_read_timeout) * 1000;
    return timeout > 0 && Date.now() - lastAt >= timeout - 400 ? "timeout" : "upstream_cut";
}

// The counts go to js_var variables (set once, read by the log) rather than js_set functions called per line.
function tokens(prompt, completion, total) {
    var v = req.variables;
    v.bastion_prompt_tokens = prompt;
    v.bastion_completion_tokens = completion;
    v.bastion_total_tokens = total;
}

// The request body towards the upstream: as the client sent it (bytes as read), or with the byte edits the
// gate named (X-Bastion-Edit: [[start, end, text], ...] in body order, authsvc/aliases.py): the model an alias,
// a default model or "auto" stands for, and stream_options.include_usage. Edits that do not fit the body are
// not applied at all (the gate computed them on this very body, so that does not happen).
function requestBody(r) {
    var ask = r.variables.bastion_body_edits;
    if (!ask) {
        var text = r.requestText;
        return text === undefined ? "" : text;
    }
    var buf = r.requestBuffer;
    if (buf === undefined) {
        return "";
    }
    var edits = parse(ask);
    var out = [];
    var at = 0;
    for (var i = 0; Array.isArray(edits) && i < edits.length; i++) {
        var e = edits[i];
        if (!Array.isArray(e) || !(e[0] >= at && e[1] >= e[0] && e[1] <= buf.length) || typeof e[2] !== "string") {
            return buf.toString();
        }
        out.push(buf.slice(at, e[0]), Buffer.from(e[2]));
        at = e[1];
    }
    out.push(buf.slice(at));
    return Buffer.concat(out).toString();
}

// ---- model aliases: the answer's top-level "model" becomes the public name -----------------------------------

// The line buf[start, stop) with its top-level "model" string replaced by the public name, or null (no such
// key: a line without "model" costs one search). SSE: the JSON after "data:"; NDJSON: the whole line.
function renameLine(buf, start, stop) {
    var from = start;
    if (kind === "sse") {
        if (stop - start < 7 || buf[start] !== 100 || buf[start + 1] !== 97) { // "da(ta:)"
            return null;
        }
        from = start + 5;
    }
    var key = buf.indexOf(MODEL, from);
    if (key === -1 || key >= stop) {
        return null;
    }
    var found = modelSpan(buf.slice(0, stop), from, {depth: 0, str: false, esc: false, nest: nested, inside: false});
    if (found === null || found.at === undefined) {
        return null;
    }
    return Buffer.concat([buf.slice(start, found.at), rename, buf.slice(found.stop, stop)]);
}

// A JSON answer: bytes go on as soon as they cannot hold the top-level "model" any more; once it is replaced
// (or cannot be: none, not a string, a cut string too long) the rest passes untouched.
function renameJson(r, data, flags) {
    var buf = jsonHeld ? Buffer.concat([jsonHeld, data]) : data;
    jsonHeld = null;
    jsonState = jsonState || {depth: 0, str: false, esc: false};
    var found = modelSpan(buf, 0, jsonState);
    if (found !== null && found.at !== undefined) {
        jsonState = false;
        r.sendBuffer(Buffer.concat([buf.slice(0, found.at), rename, buf.slice(found.stop)]), flags);
        return;
    }
    if (found === null || flags.last || buf.length - found.resume > HOLD_KEEP) {
        jsonState = false; // no top-level model (or it cannot be told): the answer as it is
        r.sendBuffer(buf, flags);
        return;
    }
    if (found.resume > 0) {
        r.sendBuffer(buf.slice(0, found.resume), FLUSH);
    }
    if (found.resume < buf.length) {
        jsonHeld = buf.slice(found.resume);
    }
}

// Where the top-level "model" string value of the JSON object starting at or after `i` is: {at, stop} (its
// quotes included), {resume} (the bytes from `resume` on are needed again with more: a top-level string cut by
// the end; `st` keeps depth and string state for what was read) or null (no top-level model string). Strings
// are skipped with searches, so what the model wrote (in strings: quotes escaped) is never taken for a key.
// With `st.nest` the model wanted is the one of the top-level "response" object (Responses API events).
function modelSpan(buf, i, st) {
    var n = buf.length;
    if (st.str) { // inside a nested string since the last chunk
        var lo = st.esc ? i + 1 : i;
        if (lo > n) {
            return {resume: n};
        }
        var q = closeQuote(buf, lo, lo);
        if (q === -1) {
            st.esc = escapesNext(buf, lo);
            return {resume: n};
        }
        st.str = false;
        st.esc = false;
        i = q + 1;
    }
    var quote = -2;
    var open = -2;
    var list = -2;
    var shut = -2;
    var endList = -2;
    for (;;) {
        quote = quote === -1 || quote >= i ? quote : buf.indexOf(34, i);
        open = open === -1 || open >= i ? open : buf.indexOf(123, i);
        list = list === -1 || list >= i ? list : buf.indexOf(91, i);
        shut = shut === -1 || shut >= i ? shut : buf.indexOf(125, i);
        endList = endList === -1 || endList >= i ? endList : buf.indexOf(93, i);
        var j = first(first(first(quote, open), first(list, shut)), endList);
        if (j === -1) {
            return {resume: n};
        }
        var b = buf[j];
        i = j + 1;
        if (b === 123 || b === 91) {
            st.depth++;
        } else if (b === 125 || b === 93) {
            if (--st.depth <= 0) {
                return null; // the top-level object ended
            }
            if (st.depth === 1 && st.inside) {
                return null; // the "response" object ended without a model
            }
        } else if (st.depth === 0) {
            return null; // not an object
        } else {
            var e = closeQuote(buf, j + 1, j + 1);
            if (e === -1) {
                if (st.depth > 1 || n - j > NAME_KEEP) { // not the key "model": skipped
                    st.str = true;
                    st.esc = escapesNext(buf, j + 1);
                    return {resume: n};
                }
                return {resume: j};
            }
            if (st.nest && st.depth === 1 && e - j === 9 && buf.indexOf(RESPONSE, j) === j) {
                var after = spaces(buf, e + 1);
                var open2 = after < n && buf[after] === 58 ? spaces(buf, after + 1) : after;
                if (open2 >= n) {
                    return {resume: j};
                }
                st.inside = buf[after] === 58 && buf[open2] === 123; // the key, its object: the model is inside
            } else if (st.depth === (st.inside ? 2 : 1) && (st.inside || !st.nest) && e - j === 6
                    && buf.indexOf(MODEL, j) === j) {
                var colon = spaces(buf, e + 1);
                if (colon >= n) {
                    return {resume: j};
                }
                if (buf[colon] === 58) { // the key "model"
                    var v = spaces(buf, colon + 1);
                    if (v >= n) {
                        return {resume: j};
                    }
                    if (buf[v] !== 34) {
                        return null; // not a string
                    }
                    var ve = closeQuote(buf, v + 1, v + 1);
                    if (ve === -1) {
                        return n - j > NAME_KEEP ? null : {resume: j};
                    }
                    return {at: v, stop: ve + 1};
                }
            }
            i = e + 1;
        }
    }
}

// The smaller of two indexes, -1 standing for none.
function first(a, b) {
    return a === -1 ? b : b === -1 ? a : a < b ? a : b;
}

// The first quote at or after `from` not escaped by backslashes at or after `lo`, or -1.
function closeQuote(buf, from, lo) {
    var i = from - 1;
    for (;;) {
        i = buf.indexOf(34, i + 1);
        if (i === -1) {
            return -1;
        }
        var slashes = 0;
        while (i - 1 - slashes >= lo && buf[i - 1 - slashes] === 92) {
            slashes++;
        }
        if (slashes % 2 === 0) {
            return i;
        }
    }
}

// Whether buf ends with an odd run of backslashes (from `lo` on): the next chunk's first byte is escaped.
function escapesNext(buf, lo) {
    var slashes = 0;
    while (buf.length - 1 - slashes >= lo && buf[buf.length - 1 - slashes] === 92) {
        slashes++;
    }
    return slashes % 2 === 1;
}

// The first index at or after `i` that is not JSON whitespace.
function spaces(buf, i) {
    while (i < buf.length && (buf[i] === 32 || buf[i] === 10 || buf[i] === 13 || buf[i] === 9)) {
        i++;
    }
    return i;
}

export default {header, body, outcome, requestBody};
