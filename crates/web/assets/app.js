// Mercato's one script: the live parts of otherwise complete server-rendered pages. Every page
// works without it; with it, statuses, availability and the analytics charts update in place.
// Served from our own origin (the Content-Security-Policy allows no inline script).
"use strict";

(function () {
  // Polls a JSON view of this page's subject until it settles.
  function poll(element, every, apply) {
    var url = element.getAttribute("data-src");
    var timer = null;
    function tick() {
      fetch(url, { credentials: "same-origin", headers: { accept: "application/json" } })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (data) {
          if (data && apply(data) === "stop") { return; }
          timer = setTimeout(tick, every);
        })
        .catch(function () { timer = setTimeout(tick, every * 3); });
    }
    timer = setTimeout(tick, every);
    return function () { clearTimeout(timer); };
  }

  // An order's status, live (order pages and "my orders").
  document.querySelectorAll("[data-live-order]").forEach(function (element) {
    if (element.getAttribute("data-settled") === "true") { return; }
    poll(element, 1000, function (order) {
      if (element.getAttribute("data-status") !== order.status) {
        element.setAttribute("data-status", order.status);
        element.textContent = order.label;
        var note = document.querySelector("[data-live-note]");
        if (note) { note.textContent = "Status changed to " + order.label + "."; }
      }
      return order.settled ? "stop" : "go";
    });
  });

  // A product's availability, live.
  document.querySelectorAll("[data-availability]").forEach(function (element) {
    poll(element, 3000, function (stock) {
      element.textContent = stock.label;
      return "go";
    });
  });

  // The console's analytics: windows from the server-sent stream, summary polled.
  var dashboard = document.querySelector("[data-analytics]");
  if (dashboard) {
    var windows = {};
    var chartOrders = dashboard.querySelector("[data-chart=orders]");
    var chartRevenue = dashboard.querySelector("[data-chart=revenue]");
    var counted = dashboard.querySelector("[data-figure=chart-orders]");
    var keep = 30;

    function number(value) {
      var n = typeof value === "number" ? value : parseFloat(value);
      return isNaN(n) ? 0 : n;
    }

    function draw(svg, key, format) {
      var starts = Object.keys(windows).sort().slice(-keep);
      var values = starts.map(function (s) { return number(windows[s][key]); });
      var max = Math.max.apply(null, values.concat([1]));
      var ns = "http://www.w3.org/2000/svg";
      var width = 600, height = 160, gap = 2;
      var bar = starts.length ? width / keep : 0;
      while (svg.lastChild && svg.lastChild.nodeName !== "title") { svg.removeChild(svg.lastChild); }
      starts.forEach(function (start, i) {
        var h = Math.max(1, Math.round((values[i] / max) * (height - 20)));
        var rect = document.createElementNS(ns, "rect");
        rect.setAttribute("x", String(i * bar + gap / 2));
        rect.setAttribute("y", String(height - h));
        rect.setAttribute("width", String(Math.max(1, bar - gap)));
        rect.setAttribute("height", String(h));
        var tip = document.createElementNS(ns, "title");
        tip.textContent = start.slice(11, 16) + " UTC: " + format(values[i]);
        rect.appendChild(tip);
        svg.appendChild(rect);
      });
    }

    function redraw() {
      draw(chartOrders, "order_count", function (v) { return v + " orders"; });
      draw(chartRevenue, "total_revenue", function (v) { return v.toFixed(2); });
      var total = 0;
      Object.keys(windows).forEach(function (s) { total += number(windows[s].order_count); });
      if (counted) { counted.textContent = String(total); }
    }

    // The recent windows first, then every update as the stream sends it (an update replaces
    // its window, so nothing is counted twice).
    fetch(dashboard.getAttribute("data-windows"), { credentials: "same-origin", headers: { accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : []; })
      .then(function (list) {
        list.forEach(function (w) { if (!windows[w.window_start]) { windows[w.window_start] = w; } });
        redraw();
      })
      .catch(function () { /* the stream still fills the charts */ });

    var source = new EventSource(dashboard.getAttribute("data-stream"));
    source.addEventListener("window", function (event) {
      try {
        var w = JSON.parse(event.data);
        windows[w.window_start] = w;
        redraw();
      } catch (e) { /* a malformed event is skipped */ }
    });

    var summary = dashboard.querySelector("[data-summary]");
    if (summary) {
      poll(summary, 2000, function (figures) {
        Object.keys(figures).forEach(function (name) {
          var cell = summary.querySelector("[data-figure='" + name + "']");
          if (cell) { cell.textContent = figures[name]; }
        });
        return "go";
      });
    }
  }
})();
