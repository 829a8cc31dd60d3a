// Bastion's token meter (njs 0.7+): header and body filters on the pool locations, and the variables the
// access log prints. Every chunk goes on to the client as soon as it arrives, untouched, except when the gate
// asked nginx to add stream_options.include_usage for a client that did not: then the usage event the
// upstream adds for it (and the "usage":null it may add to every chunk) is taken out, whole events at a time,
// so the client gets exactly the stream it would have got without Bastion. See docs/operations.md.
//
// njs gives each request its own copy of these globals: they are the request's state.

var JSON_KEEP = 1048576; // a JSON answer up to this size is parsed whole; above it only its tail is read
var TAIL_KEEP = 65536;
var USAGE_NULL = /, ?"usage": ?null\}$/; // applied to a line without its end (PCRE's $ also matches before \n)

var seen = false; // the upstream's answer reached the header filter
var ended = false; // its last byte went on (the body filter saw the last buffer)
var kind = ""; // "sse", "ndjson", "json" or "" (anything else: only its end is watched)
var strip = false; // take out what the injected include_usage added
var finished = false; // the format's own end mark: data: [DONE], "done":true, or a whole JSON body
var needsMark = false; // this format must end with its mark (chat/completion streams)
var rest = null; // bytes after the last newline, waiting for the rest of their line
var held = []; // strip mode: the lines of the event being read, not yet sent
var dropping = false; // strip mode: the event being read is the injected usage event
var parts = []; // json: the body so far (or its tail, past JSON_KEEP)
var size = 0;
var whole = true;
var lastAt = 0; // ms: the last bytes from the upstream
var prompt = "";
var completion = "";
var total = "";

function header(r) {
    seen = true;
    lastAt = Date.now();
    var type = (r.headersOut["Content-Type"] || "").toLowerCase();
    if (type.indexOf("text/event-stream") === 0) {
        kind = "sse";
        needsMark = /^\/v1\/(chat\/)?completions$/.test(r.uri);
        strip = Boolean(r.variables.bastion_usage_insert) && r.status === 200;
        if (strip) {
            delete r.headersOut["Content-Length"]; // events may be taken out
        }
    } else if (type.indexOf("application/x-ndjson") === 0) {
        kind = "ndjson";
        needsMark = /^\/api\/(chat|generate)$/.test(r.uri);
    } else if (type.indexOf("application/json") === 0) {
        kind = "json";
    }
}

function body(r, data, flags) {
    if (data.length) {
        lastAt = Date.now();
    }
    if (!strip) {
        r.sendBuffer(data, flags); // first: the client never waits for the meter
    }
    if (kind === "json") {
        keep(data);
    } else if (kind !== "") {
        lines(r, data, flags.last);
    }
    if (flags.last) {
        ended = true;
        if (kind === "json") {
            readJson();
        }
        if (strip) {
            r.sendBuffer(held.length ? Buffer.concat(held) : "", flags);
            held = [];
        }
    } else if (strip && flags.flush) {
        r.sendBuffer("", flags);
    }
}

// Complete lines of `data` (with what was left of the previous chunk) go to `line`; a newline byte never
// occurs inside a multibyte character, so a line is always whole UTF-8.
function lines(r, data, last) {
    var buf = rest === null ? data : Buffer.concat([rest, data]);
    rest = null;
    var start = 0;
    var nl = buf.indexOf(10);
    while (nl !== -1) {
        line(r, buf.slice(start, nl + 1));
        start = nl + 1;
        nl = buf.indexOf(10, start);
    }
    if (start < buf.length) {
        if (last) {
            line(r, buf.slice(start));
        } else {
            rest = buf.slice(start);
        }
    }
}

function line(r, raw) {
    if (kind === "ndjson") {
        if (raw.indexOf('"done"') !== -1) {
            ollama(parse(raw.toString()), true);
        }
        return;
    }
    var text = null;
    if (raw[0] === 100 && raw.indexOf("data:") === 0) { // "d"
        text = raw.toString();
        var payload = text.slice(5).trim();
        if (payload === "[DONE]") {
            finished = true;
        } else if (payload.indexOf('"usage"') !== -1) {
            var event = parse(payload);
            if (event && event.usage && typeof event.usage === "object") {
                openai(event.usage);
                if (strip && Array.isArray(event.choices) && event.choices.length === 0) {
                    held = []; // the injected usage event: dropped with the blank line that ends it
                    dropping = true;
                    return;
                }
            }
            if (strip) {
                raw = withoutNullUsage(raw, text);
            }
        }
    }
    if (!strip) {
        return;
    }
    var blank = raw.length === 1 || (raw.length === 2 && raw[0] === 13);
    if (dropping) {
        dropping = !blank;
        return;
    }
    held.push(raw);
    if (blank) {
        r.sendBuffer(Buffer.concat(held), {flush: true});
        held = [];
    }
}

// `"usage":null` closing a chunk: what include_usage adds to every chunk (OpenAI does, vLLM does not)
function withoutNullUsage(raw, text) {
    var eol = text.slice(-2) === "\r\n" ? 2 : text.slice(-1) === "\n" ? 1 : 0;
    var core = text.slice(0, text.length - eol);
    var m = core.match(USAGE_NULL);
    return m ? Buffer.from(core.slice(0, m.index) + "}" + text.slice(text.length - eol)) : raw;
}

function keep(data) {
    parts.push(data);
    size += data.length;
    if (size > JSON_KEEP) {
        whole = false;
        while (parts.length > 1 && size - parts[0].length >= TAIL_KEEP) {
            size -= parts[0].length;
            parts.shift();
        }
    }
}

function readJson() {
    var text = parts.length === 1 ? parts[0].toString() : Buffer.concat(parts).toString();
    parts = [];
    finished = true;
    if (whole) {
        var doc = parse(text);
        if (doc && typeof doc === "object") {
            if (doc.usage && typeof doc.usage === "object") {
                openai(doc.usage);
            } else {
                ollama(doc, false);
            }
        }
        return;
    }
    // too big to parse: the last top-level "usage" object (OpenAI puts it at the end; a string cannot hold
    // an unescaped quote, so `"usage":{` is a key) or Ollama's counts
    var at = text.lastIndexOf('"usage":');
    if (at !== -1) {
        var u = {};
        ["prompt_tokens", "completion_tokens", "total_tokens"].forEach(function(name) {
            var m = text.slice(at).match(new RegExp('"' + name + '": ?(\\d+)'));
            if (m) {
                u[name] = Number(m[1]);
            }
        });
        openai(u);
    } else {
        var p = text.match(/"prompt_eval_count": ?(\d+)/);
        var e = text.match(/"eval_count": ?(\d+)/);
        ollama({prompt_eval_count: p ? Number(p[1]) : undefined, eval_count: e ? Number(e[1]) : undefined}, false);
    }
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
    prompt = count(usage.prompt_tokens);
    completion = count(usage.completion_tokens);
    total = count(usage.total_tokens);
    if (total === "" && prompt !== "" && completion !== "") {
        total = String(Number(prompt) + Number(completion));
    }
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
    prompt = p || "0";
    completion = c || "0";
    total = String(Number(prompt) + Number(completion));
}

// The outcome, read when the access log line is written.
function outcome(r) {
    var v = r.variables;
    if (!v.bastion_pool) {
        return "";
    }
    if (!seen) { // no answer from the upstream (or nginx's own error page replaced it)
        var status = Number(v.status);
        return status === 504 ? "timeout" : status === 499 ? "client_cut" : status >= 500 ? "upstream_cut" : "completed";
    }
    if (ended) {
        return finished || !needsMark ? "completed" : "upstream_cut";
    }
    // cut before its end: nginx finishes the request normally after an upstream error, but terminates it
    // when the client went away (or timed out reading)
    if (v.request_completion !== "OK") {
        return "client_cut";
    }
    // proxy_read_timeout: silence for that long (nginx re-arms its timer lazily: it may fire up to 300 ms early)
    var timeout = Number(v.bastion_read_timeout) * 1000;
    return timeout > 0 && Date.now() - lastAt >= timeout - 400 ? "timeout" : "upstream_cut";
}

function promptTokens() {
    return prompt;
}

function completionTokens() {
    return completion;
}

function totalTokens() {
    return total;
}

// The request body towards the upstream: as the client sent it, or with the text the gate asked for
// (X-Bastion-Usage: "<byte offset> <text>", see authsvc/usage.py) inserted at that offset.
function requestBody(r) {
    var text = r.requestText;
    var ask = r.variables.bastion_usage_insert;
    if (!ask || text === undefined) {
        return text === undefined ? "" : text;
    }
    var space = ask.indexOf(" ");
    var at = Number(ask.slice(0, space));
    if (space < 1 || !(at >= 0 && at <= text.length)) {
        return text;
    }
    return text.slice(0, at) + ask.slice(space + 1) + text.slice(at);
}

export default {header, body, outcome, promptTokens, completionTokens, totalTokens, requestBody};
