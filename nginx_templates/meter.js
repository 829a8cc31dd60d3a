// Bastion's token meter (njs 0.7+): header and body filters on the pool locations, and the variables the
// access log prints (outcome, prompt/completion/total tokens). Every chunk goes on to the client as soon as
// it arrives, untouched, except when the gate asked nginx to add stream_options.include_usage for a client
// that did not ask (X-Bastion-Usage, authsvc/usage.py): then the usage event the upstream adds for it, and
// the "usage":null it may add to every chunk, are taken out again, whole events at a time, so the client gets
// exactly the stream it would have got without Bastion. See docs/operations.md, "Token metering".
//
// njs gives each request its own copy of these globals: they are the request's state. The hot path (every
// chunk of a stream) finds line ends with single-byte searches and looks at the last bytes of each line; only
// a line that ends like a usage event or Ollama's last line is searched, decoded and parsed.

var JSON_KEEP = 1048576; // of a JSON answer longer than this only the last JSON_KEEP bytes are read
var LINE_KEEP = 1048576; // a line longer than this is not pieced together (it cannot be a usage line)
var HOLD_KEEP = 65536; // strip mode: an unfinished event longer than this goes on as it is
// Needles are strings, not Buffers: njs runs this top-level code again for every request (njs_vm_start).
var USAGE = '"usage"';
var PROMPT_TOKENS = '"prompt_tokens"';
var COMPLETION_TOKENS = '"completion_tokens"';
var TOTAL_TOKENS = '"total_tokens"';
var PROMPT_EVAL_COUNT = '"prompt_eval_count"';
var EVAL_COUNT = '"eval_count"';
var DONE = "[DONE]";
var DONE_TRUE = '"done":true';
var DONE_TRUE_SPACED = '"done": true';

var seen = false; // the upstream's answer reached the header filter
var ended = false; // its last byte went on (the body filter saw the last buffer)
var kind = ""; // "sse", "ndjson", "json" or "" (anything else: only its end is watched)
var strip = false; // take out what the injected include_usage added
var finished = false; // the format's own end mark: data: [DONE], "done":true, or a whole JSON body
var needsMark = false; // this answer must end with its mark (chat and completion streams)
var rest = []; // bytes after the last newline (strip mode: after the last complete event), not yet read
var restSize = 0;
var dropping = false; // strip mode: inside the injected usage event
var parts = []; // json: the body so far (its tail past JSON_KEEP)
var size = 0;
var lastAt = 0; // ms: the last bytes from the upstream
var req = null; // the request, to set the token variables (js_var) once they are known

function header(r) {
    req = r;
    seen = true;
    lastAt = Date.now();
    if (r.method === "HEAD" || r.status === 204 || r.status === 304) {
        ended = true; // no body follows
        return;
    }
    var type = (r.headersOut["Content-Type"] || "").toLowerCase();
    if (type.indexOf("text/event-stream") === 0) {
        kind = "sse";
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
    }
}

function body(r, data, flags) {
    if (data.length) {
        lastAt = Date.now();
    }
    if (kind === "sse" || kind === "ndjson") {
        stream(r, data, flags);
    } else {
        r.sendBuffer(data, flags);
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
    if (!strip) {
        r.sendBuffer(data, flags); // first: the client never waits for the meter
    }
    var buf = restSize ? held(data) : data;
    var end = flags.last ? buf.length : boundary(buf);
    if (strip && buf.length - end > HOLD_KEEP) {
        end = buf.length; // no event ends: let it through rather than hold the stream back
    }
    if (end < buf.length && !hold(buf.slice(end)) && strip) {
        end = buf.length;
    }
    var out = scan(buf, end);
    if (strip) {
        var events = out === null ? buf.slice(0, end) : out.length === 1 ? out[0] : Buffer.concat(out);
        if (events.length || flags.last) {
            r.sendBuffer(events, flags.last ? flags : {last: false, flush: true});
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
    var start = 0;
    while (start < end) {
        var nl = buf.indexOf(10, start);
        var stop = nl === -1 || nl >= end ? end : nl + 1;
        var verdict = kind === "sse" ? sseLine(buf, start, stop) : ndjsonLine(buf, start, stop);
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

// One SSE line: true to keep it, null to drop it, or the Buffer to send instead. Only its last bytes are
// looked at, unless they look like the end of a usage event: `}}` or `[]}` (`"choices":[]` last).
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
    var before = buf[end - 2];
    if (last !== 125 || end - start < 20) {
        return true;
    }
    if (before === 108) { // "l}": maybe "usage":null
        return strip ? withoutNullUsage(buf, start, end, stop) : true;
    }
    if (before !== 125 && !(before === 93 && buf[end - 3] === 91)) {
        return true;
    }
    if (buf.slice(Math.max(start, end - 1024), end).indexOf(USAGE) === -1) {
        return true;
    }
    var event = parse(buf.slice(start + 5, end).toString());
    if (!event || !event.usage || typeof event.usage !== "object") {
        return true;
    }
    openai(event.usage);
    if (strip && Array.isArray(event.choices) && event.choices.length === 0) {
        dropping = true;
        return null;
    }
    return true;
}

// `"usage":null` closing a chunk: what include_usage adds to every chunk (OpenAI does, vLLM does not).
function withoutNullUsage(buf, start, end, stop) {
    var tail = buf.slice(Math.max(start, end - 16), end).toString();
    var cut = tail.endsWith(',"usage":null}') ? 14 : tail.endsWith(', "usage": null}') ? 16 : 0;
    if (!cut) {
        return true;
    }
    return Buffer.concat([buf.slice(start, end - cut), Buffer.from("}"), buf.slice(end, stop)]);
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
// VM costs more than everything else the meter does. OpenAI: the last `"usage":` (a string cannot hold an
// unescaped quote, so it is a key; answers put it at the top level, usually last) and the integers after it;
// Ollama: its last `"prompt_eval_count"` and `"eval_count"`.
function readJson() {
    var buf = parts.length === 1 ? parts[0] : Buffer.concat(parts);
    parts = [];
    finished = true;
    var at = buf.lastIndexOf(USAGE);
    if (at !== -1) {
        var prompt = integer(buf, PROMPT_TOKENS, at);
        var completion = integer(buf, COMPLETION_TOKENS, at);
        var total = integer(buf, TOTAL_TOKENS, at);
        if (total === "" && prompt !== "" && completion !== "") {
            total = String(Number(prompt) + Number(completion));
        }
        if (prompt !== "" || completion !== "" || total !== "") {
            tokens(prompt, completion, total);
        }
        return;
    }
    var p = integer(buf, PROMPT_EVAL_COUNT, buf.lastIndexOf(PROMPT_EVAL_COUNT));
    var c = integer(buf, EVAL_COUNT, buf.lastIndexOf(EVAL_COUNT));
    if (p !== "" || c !== "") {
        tokens(p || "0", c || "0", String(Number(p || "0") + Number(c || "0")));
    }
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
    var prompt = count(usage.prompt_tokens);
    var completion = count(usage.completion_tokens);
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
    if (ended) {
        return finished || !needsMark ? "completed" : "upstream_cut";
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

// The request body towards the upstream: as the client sent it (bytes as read), or with the text the gate
// asked for inserted at the byte offset it named (X-Bastion-Usage: "<offset> <text>").
function requestBody(r) {
    var text = r.requestText;
    if (text === undefined) {
        return "";
    }
    var ask = r.variables.bastion_usage_insert;
    var space = ask ? ask.indexOf(" ") : -1;
    var at = space > 0 ? Number(ask.slice(0, space)) : NaN;
    if (!(at >= 0 && at <= text.length)) {
        return text;
    }
    return text.slice(0, at) + ask.slice(space + 1) + text.slice(at);
}

export default {header, body, outcome, requestBody};
