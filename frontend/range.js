// The time range picker shared by the dashboard and the usage page: last hour/day/week or custom dates.
import { field, h } from "./dom.js";

export const RANGES = { hour: [3600, "minute"], day: [86400, "hour"], week: [7 * 86400, "hour"] };

/** A range control; `value()` gives {since, until, bucket, span}; `onchange` is called on every change. */
export function rangePicker(onchange, initial = "day") {
  const select = h("select", { name: "range" },
    [["hour", "Last hour"], ["day", "Last 24 hours"], ["week", "Last 7 days"], ["custom", "Custom"]]
      .map(([v, label]) => h("option", { value: v, selected: v === initial }, label)));
  const from = h("input", { type: "datetime-local", name: "from" });
  const to = h("input", { type: "datetime-local", name: "to" });
  const custom = h("div", { class: "filters", hidden: initial !== "custom" }, field("From", from), field("To", to));
  const value = () => {
    const now = Math.floor(Date.now() / 1000);
    if (select.value !== "custom") {
      const [span, bucket] = RANGES[select.value];
      return { since: now - span, until: null, bucket, span };
    }
    const since = from.value ? Math.floor(new Date(from.value).getTime() / 1000) : now - 86400;
    const until = to.value ? Math.floor(new Date(to.value).getTime() / 1000) : null;
    const span = (until ?? now) - since;
    return { since, until, span, bucket: span <= 3 * 3600 ? "minute" : span <= 14 * 86400 ? "hour" : "day" };
  };
  select.addEventListener("change", () => { custom.hidden = select.value !== "custom"; onchange(); });
  from.addEventListener("change", onchange);
  to.addEventListener("change", onchange);
  return { element: h("div", { class: "filters" }, field("Range", select), custom), value };
}
