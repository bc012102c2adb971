"""Plain text out of a MediaWiki XML dump: the pages, then their markup stripped.

Used for the `wiki-sample` pretraining corpus (train/data/datasets.py). This is a small, readable
stripper in the spirit of WikiExtractor, not a wikitext parser: it removes what would otherwise
reach the model as noise (templates, tables, file and category links, references, HTML, list
bullets) and keeps the visible words of the article.

Known limits: templates are dropped whole, so text that a template would render (dates from
{{birth date|...}}, unit conversions from {{convert|...}}) is lost; a link's anchor text is kept
but a link whose trailing letters extend it ([[bus]]es) keeps them as written; the few math and
chemistry formulas become empty; an unbalanced `{{` drops the rest of its page rather than guess.
"""

import html
import re
import xml.etree.ElementTree as ET

# Sections that hold lists of sources and links rather than prose; dropped from their heading on.
TAIL_SECTIONS = {"references", "external links", "see also", "further reading", "notes",
                 "bibliography", "sources", "footnotes", "citations"}

# Links to these namespaces render as images, galleries or category tags, not as words.
_DROPPED_LINKS = re.compile(r"\s*:?\s*(file|image|media|category)\s*:", re.I)
# [[de:Artikel]]: an interlanguage link (a language code, a colon, no pipe).
_INTERLANGUAGE = re.compile(r"[a-z]{2,3}(-[a-z]+)?:[^|]*$")


def iter_pages(f):
    """(title, namespace, wikitext, is_redirect) for each <page> of a MediaWiki export read from
    the binary file `f`; elements are cleared as we go, so a dump of any size streams."""
    for _, el in ET.iterparse(f):
        if el.tag.rsplit("}", 1)[-1] != "page":  # tags carry the export's xmlns
            continue
        text = el.findtext("{*}revision/{*}text") or ""
        redirect = el.find("{*}redirect") is not None or text.lstrip().lower().startswith(
            "#redirect")
        yield el.findtext("{*}title"), int(el.findtext("{*}ns")), text, redirect
        el.clear()


def drop_nested(text, open_, close):
    """`text` without every balanced `open_ ... close` span, nesting included ({{a|{{b}}}})."""
    tokens = re.compile(re.escape(open_) + "|" + re.escape(close))
    out, depth, kept_from = [], 0, 0
    for m in tokens.finditer(text):
        if m.group() == open_:
            if depth == 0:
                out.append(text[kept_from:m.start()])
            depth += 1
        elif depth > 0:  # a stray closer outside any span is ordinary text
            depth -= 1
            if depth == 0:
                kept_from = m.end()
    if depth == 0:  # else the last span never closed: drop to the end
        out.append(text[kept_from:])
    return "".join(out)


def drop_links(text):
    """[[File:...]], [[Image:...]], [[Category:...]] and interlanguage links removed whole
    (captions may hold links of their own, hence the depth count); other [[...]] kept as is."""
    out, depth, kept_from, start = [], 0, 0, 0
    for m in re.finditer(r"\[\[|\]\]", text):
        if m.group() == "[[":
            if depth == 0:
                start = m.start()
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                target = text[start + 2:m.start()]
                if _DROPPED_LINKS.match(target) or _INTERLANGUAGE.match(target):
                    out.append(text[kept_from:start])
                    kept_from = m.end()
    out.append(text[kept_from:])
    return "".join(out)


def drop_tail_sections(text):
    for m in re.finditer(r"^(=+)\s*(.*?)\s*\1\s*$", text, flags=re.M):
        if m.group(2).lower() in TAIL_SECTIONS:
            return text[:m.start()]
    return text


def strip_markup(text):
    """The visible prose of one page's wikitext, whitespace collapsed to single spaces."""
    text = re.sub(r"<!--.*?(-->|$)", "", text, flags=re.S)
    text = drop_tail_sections(text)
    # <ref>s are footnotes; <math>, <gallery> and the like render as no words we can keep.
    text = re.sub(r"<ref[^>]*/>", "", text, flags=re.I)
    text = re.sub(r"<(ref|math|gallery|timeline|score|source|syntaxhighlight|imagemap)\b[^>]*>"
                  r".*?</\1\s*>", "", text, flags=re.I | re.S)
    text = drop_nested(text, "{{", "}}")
    text = drop_nested(text, "{|", "|}")
    text = drop_links(text)
    text = re.sub(r"\[\[[^\[\]|]*\|([^\[\]]*)\]\]", r"\1", text)  # [[target|shown]] -> shown
    text = re.sub(r"\[\[([^\[\]]*)\]\]", r"\1", text)  # [[target]] -> target
    text = re.sub(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]", r"\1", text)  # [url label]
    text = re.sub(r"<br\s*/?>", " ", text, flags=re.I)  # a line break separates words
    text = re.sub(r"</?[a-zA-Z][^<>]*>", "", text)  # other tags: <small>, <sup>, <div ...>
    text = re.sub(r"'{2,}", "", text)  # ''italic'', '''bold''', '''''both'''''
    text = re.sub(r"^(=+)\s*(.*?)\s*\1\s*$", r"\2", text, flags=re.M)  # == Heading == -> Heading
    text = re.sub(r"^[*#:;]+\s*", "", text, flags=re.M)  # list bullets and indents
    text = re.sub(r"__[A-Z]+__", "", text)  # __NOTOC__ and other magic words
    text = html.unescape(text)  # &nbsp; &ndash; (the XML parser has undone one level already)
    return " ".join(text.split())
