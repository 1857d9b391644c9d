// A reply's Markdown as safe HTML: marked parses it, raw HTML in it is shown as text (never
// parsed into elements), images become links (the page loads nothing a reply names), code
// blocks are highlighted by highlight.js, and DOMPurify sanitises the result before it meets the
// DOM. The Content-Security-Policy (no inline script) is the second wall behind this one.
"use strict";

const Render = (() => {
  const escape = (s) => String(s).replace(/[&<>"']/g,
    (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

  function highlighted(text, lang) {
    const language = (lang || "").trim().split(/\s+/)[0].toLowerCase();
    if (window.hljs && language && hljs.getLanguage(language)) {
      try {
        return { html: hljs.highlight(text, { language, ignoreIllegals: true }).value, language };
      } catch (e) { /* shown plain below */ }
    }
    return { html: escape(text), language: "" };
  }

  const parser = new marked.Marked({ gfm: true, breaks: false, async: false });
  parser.use({
    renderer: {
      html(token) { return escape(token.text); },
      image(token) {
        return `<a href="${escape(token.href)}" rel="noopener noreferrer" target="_blank">${escape(token.text || token.href)}</a>`;
      },
      code(token) {
        const { html, language } = highlighted(token.text, token.lang);
        const label = language ? `<span class="lang">${escape(language)}</span>` : "";
        return `<div class="code">${label}<pre><code class="hljs${language ? " language-" + escape(language) : ""}">${html}</code></pre></div>`;
      },
    },
  });

  const PURIFY = {
    USE_PROFILES: { html: true },
    FORBID_TAGS: ["img", "style", "form", "input", "button", "textarea", "select", "iframe", "object", "embed",
      "video", "audio", "source", "svg", "math", "link", "meta", "base"],
    FORBID_ATTR: ["style", "srcset", "formaction"],
  };

  // Links open in a new tab, without telling the other site where they came from.
  if (window.DOMPurify) {
    DOMPurify.addHook("afterSanitizeAttributes", (node) => {
      if (node.tagName === "A") {
        node.setAttribute("target", "_blank");
        node.setAttribute("rel", "noopener noreferrer");
      }
    });
  }

  /** The HTML of `markdown`, sanitised. */
  function html(markdown) {
    return DOMPurify.sanitize(parser.parse(String(markdown || "")), PURIFY);
  }

  /** Put `markdown`, rendered, into `element`. */
  function into(element, markdown) {
    element.innerHTML = html(markdown);
  }

  return { html, into, escape };
})();
