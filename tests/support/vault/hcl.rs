//! An HCL (version 1, the dialect Vault 1.15 parses policies with) parser for the subset that
//! policies use, and Vault's policy rules on top of it.
//!
//! Syntax: items `key = value` and blocks `key "label" ... { items }`, optionally separated by
//! commas; values are strings (`"..."` with Go escapes), heredocs (`<<EOF` / `<<-EOF`), numbers,
//! `true`/`false`, lists `[a, b,]` and objects `{ ... }`; comments `#`, `//` and `/* */`. A document
//! whose first character is `{` is JSON, as HCL 1 accepts it.
//!
//! Policy rules (Vault's `parseACLPolicyWithTemplating` and `parsePaths`): top-level keys `name`
//! and `path` only; a path block may hold `comment`, `policy`, `capabilities`,
//! `allowed_parameters`, `denied_parameters`, `required_parameters`, `min_wrapping_ttl`,
//! `max_wrapping_ttl`, `mfa_methods`, `control_group`, `subscribe_event_types`; capabilities are
//! `create read update patch delete list sudo deny subscribe` (`deny` wins over the others in the
//! same block); the old `policy = "read" | "write" | "sudo" | "deny"` maps onto capabilities; a
//! leading `/` is dropped; `+*` is forbidden. Parameter constraints, wrapping TTLs, MFA and control
//! groups are parsed and kept but NOT enforced by the double (see [`PathRule::unenforced`]).

use std::fmt;

use super::util;

/// A value in an HCL document.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    String(String),
    Number(String),
    Bool(bool),
    List(Vec<Value>),
    Object(Vec<Item>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::String(_) => "string",
            Value::Number(_) => "number",
            Value::Bool(_) => "bool",
            Value::List(_) => "list",
            Value::Object(_) => "object",
        }
    }
}

/// `keys... = value` or `keys... { object }`, with the 1-based line it starts on.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Item {
    pub keys: Vec<String>,
    pub value: Value,
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Heredoc(String),
    Number(String),
    Bool(bool),
    Assign,
    LBrace,
    RBrace,
    LBrack,
    RBrack,
    Comma,
    Eof,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Ident(s) => write!(f, "IDENT {s}"),
            Tok::Str(s) => write!(f, "STRING {s:?}"),
            Tok::Heredoc(_) => write!(f, "HEREDOC"),
            Tok::Number(n) => write!(f, "NUMBER {n}"),
            Tok::Bool(b) => write!(f, "BOOL {b}"),
            Tok::Assign => write!(f, "ASSIGN"),
            Tok::LBrace => write!(f, "LBRACE"),
            Tok::RBrace => write!(f, "RBRACE"),
            Tok::LBrack => write!(f, "LBRACK"),
            Tok::RBrack => write!(f, "RBRACK"),
            Tok::Comma => write!(f, "COMMA"),
            Tok::Eof => write!(f, "EOF"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Pos {
    line: usize,
    col: usize,
}

fn err_at(pos: Pos, msg: impl fmt::Display) -> String {
    format!("At {}:{}: {msg}", pos.line, pos.col)
}

struct Lexer<'a> {
    chars: Vec<char>,
    i: usize,
    line: usize,
    col: usize,
    _src: &'a str,
}

impl<'a> Lexer<'a> {
    fn new(src: &'a str) -> Self {
        Lexer {
            chars: src.chars().collect(),
            i: 0,
            line: 1,
            col: 1,
            _src: src,
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.i).copied()
    }

    fn peek_at(&self, n: usize) -> Option<char> {
        self.chars.get(self.i + n).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.chars.get(self.i).copied()?;
        self.i += 1;
        if c == '\n' {
            self.line += 1;
            self.col = 1;
        } else {
            self.col += 1;
        }
        Some(c)
    }

    fn pos(&self) -> Pos {
        Pos {
            line: self.line,
            col: self.col,
        }
    }

    fn skip_trivia(&mut self) -> Result<(), String> {
        loop {
            match self.peek() {
                Some(c) if c.is_whitespace() => {
                    self.bump();
                }
                Some('#') => self.skip_line(),
                Some('/') if self.peek_at(1) == Some('/') => self.skip_line(),
                Some('/') if self.peek_at(1) == Some('*') => {
                    let start = self.pos();
                    self.bump();
                    self.bump();
                    loop {
                        match self.peek() {
                            None => return Err(err_at(start, "comment not terminated")),
                            Some('*') if self.peek_at(1) == Some('/') => {
                                self.bump();
                                self.bump();
                                break;
                            }
                            Some(_) => {
                                self.bump();
                            }
                        }
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    fn skip_line(&mut self) {
        while let Some(c) = self.peek() {
            if c == '\n' {
                break;
            }
            self.bump();
        }
    }

    fn next(&mut self) -> Result<(Tok, Pos), String> {
        self.skip_trivia()?;
        let pos = self.pos();
        let Some(c) = self.peek() else {
            return Ok((Tok::Eof, pos));
        };
        let tok = match c {
            '=' => {
                self.bump();
                Tok::Assign
            }
            '{' => {
                self.bump();
                Tok::LBrace
            }
            '}' => {
                self.bump();
                Tok::RBrace
            }
            '[' => {
                self.bump();
                Tok::LBrack
            }
            ']' => {
                self.bump();
                Tok::RBrack
            }
            ',' => {
                self.bump();
                Tok::Comma
            }
            '"' => Tok::Str(self.string(pos)?),
            '<' if self.peek_at(1) == Some('<') => Tok::Heredoc(self.heredoc(pos)?),
            c if c.is_ascii_digit()
                || (c == '-' && self.peek_at(1).is_some_and(|d| d.is_ascii_digit())) =>
            {
                let mut s = String::new();
                s.push(self.bump().unwrap_or_default());
                while let Some(d) = self.peek() {
                    if d.is_ascii_alphanumeric() || d == '.' || d == '+' || d == '-' {
                        s.push(d);
                        self.bump();
                    } else {
                        break;
                    }
                }
                let plain = s.trim_start_matches('-');
                let valid = plain.parse::<f64>().is_ok()
                    || (plain.starts_with("0x") && u64::from_str_radix(&plain[2..], 16).is_ok());
                if !valid {
                    return Err(err_at(pos, format!("illegal number {s:?}")));
                }
                Tok::Number(s)
            }
            c if c.is_alphabetic() || c == '_' => {
                let mut s = String::new();
                while let Some(d) = self.peek() {
                    if d.is_alphanumeric() || d == '_' || d == '-' || d == '.' {
                        s.push(d);
                        self.bump();
                    } else {
                        break;
                    }
                }
                match s.as_str() {
                    "true" => Tok::Bool(true),
                    "false" => Tok::Bool(false),
                    _ => Tok::Ident(s),
                }
            }
            other => return Err(err_at(pos, format!("illegal char {other:?}"))),
        };
        Ok((tok, pos))
    }

    fn string(&mut self, start: Pos) -> Result<String, String> {
        self.bump(); // opening quote
        let mut out = String::new();
        // Depth of `${ ... }` interpolations, inside which quotes do not end the string.
        let mut interp = 0usize;
        loop {
            let pos = self.pos();
            match self.bump() {
                None | Some('\n') => return Err(err_at(start, "literal not terminated")),
                Some('"') if interp == 0 => return Ok(out),
                Some('$') if self.peek() == Some('{') => {
                    self.bump();
                    interp += 1;
                    out.push_str("${");
                }
                Some('}') if interp > 0 => {
                    interp -= 1;
                    out.push('}');
                }
                Some('\\') => {
                    let escaped = self
                        .bump()
                        .ok_or_else(|| err_at(start, "literal not terminated"))?;
                    match escaped {
                        'n' => out.push('\n'),
                        't' => out.push('\t'),
                        'r' => out.push('\r'),
                        'a' => out.push('\u{7}'),
                        'b' => out.push('\u{8}'),
                        'f' => out.push('\u{c}'),
                        'v' => out.push('\u{b}'),
                        '\\' => out.push('\\'),
                        '"' => out.push('"'),
                        '\'' => out.push('\''),
                        'x' => out.push(self.hex_escape(2, pos)?),
                        'u' => out.push(self.hex_escape(4, pos)?),
                        'U' => out.push(self.hex_escape(8, pos)?),
                        d @ '0'..='7' => {
                            let mut value = d.to_digit(8).unwrap_or(0);
                            for _ in 0..2 {
                                let next = self
                                    .bump()
                                    .and_then(|c| c.to_digit(8))
                                    .ok_or_else(|| err_at(pos, "illegal char escape"))?;
                                value = value * 8 + next;
                            }
                            out.push(
                                char::from_u32(value)
                                    .ok_or_else(|| err_at(pos, "illegal char escape"))?,
                            );
                        }
                        _ => return Err(err_at(pos, "illegal char escape")),
                    }
                }
                Some(c) => out.push(c),
            }
        }
    }

    fn hex_escape(&mut self, digits: usize, pos: Pos) -> Result<char, String> {
        let mut value = 0u32;
        for _ in 0..digits {
            let d = self
                .bump()
                .and_then(|c| c.to_digit(16))
                .ok_or_else(|| err_at(pos, "illegal char escape"))?;
            value = value * 16 + d;
        }
        char::from_u32(value)
            .ok_or_else(|| err_at(pos, "escape sequence is invalid Unicode code point"))
    }

    fn heredoc(&mut self, start: Pos) -> Result<String, String> {
        self.bump();
        self.bump();
        let indented = self.peek() == Some('-');
        if indented {
            self.bump();
        }
        let mut anchor = String::new();
        while let Some(c) = self.peek() {
            if c.is_alphanumeric() || c == '_' {
                anchor.push(c);
                self.bump();
            } else {
                break;
            }
        }
        if anchor.is_empty() {
            return Err(err_at(start, "zero-length heredoc anchor"));
        }
        if self.peek() == Some('\r') {
            self.bump();
        }
        if self.bump() != Some('\n') {
            return Err(err_at(start, "invalid characters in heredoc anchor"));
        }
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let mut ended = false;
            loop {
                match self.bump() {
                    None => {
                        ended = true;
                        break;
                    }
                    Some('\n') => break,
                    Some(c) => line.push(c),
                }
            }
            let candidate = line.trim_end_matches('\r');
            let candidate = if indented {
                candidate.trim_start()
            } else {
                candidate
            };
            if candidate == anchor {
                break;
            }
            if ended {
                return Err(err_at(start, "heredoc not terminated"));
            }
            lines.push(line);
        }
        if indented {
            let indent = lines
                .iter()
                .filter(|l| !l.trim().is_empty())
                .map(|l| l.len() - l.trim_start().len())
                .min()
                .unwrap_or(0);
            for line in &mut lines {
                *line = line.chars().skip(indent).collect();
            }
        }
        let mut text = lines.join("\n");
        text.push('\n');
        Ok(text)
    }
}

struct Parser<'a> {
    lexer: Lexer<'a>,
    peeked: Option<(Tok, Pos)>,
}

impl<'a> Parser<'a> {
    fn peek(&mut self) -> Result<&(Tok, Pos), String> {
        if self.peeked.is_none() {
            self.peeked = Some(self.lexer.next()?);
        }
        Ok(self.peeked.as_ref().expect("just filled"))
    }

    fn next(&mut self) -> Result<(Tok, Pos), String> {
        match self.peeked.take() {
            Some(t) => Ok(t),
            None => self.lexer.next(),
        }
    }

    /// Items until `}` (when `nested`) or the end of input.
    fn object_list(&mut self, nested: bool) -> Result<Vec<Item>, String> {
        let mut items = Vec::new();
        loop {
            let (tok, pos) = self.peek()?.clone();
            match tok {
                Tok::Eof if nested => return Err(err_at(pos, "expected: RBRACE got: EOF")),
                Tok::Eof => return Ok(items),
                Tok::RBrace if nested => return Ok(items),
                _ => {}
            }
            items.push(self.object_item()?);
            if self.peek()?.0 == Tok::Comma {
                self.next()?;
            }
        }
    }

    fn object_item(&mut self) -> Result<Item, String> {
        let mut keys = Vec::new();
        let mut line = 0;
        loop {
            let (tok, pos) = self.next()?;
            if line == 0 {
                line = pos.line;
            }
            match tok {
                Tok::Ident(k) | Tok::Str(k) => keys.push(k),
                Tok::Assign if !keys.is_empty() => {
                    if keys.len() > 1 {
                        return Err(err_at(
                            pos,
                            format!(
                                "nested object expected: LBRACE got: ASSIGN (after keys {keys:?})"
                            ),
                        ));
                    }
                    let value = self.value()?;
                    return Ok(Item { keys, value, line });
                }
                Tok::LBrace if !keys.is_empty() => {
                    let items = self.object_list(true)?;
                    self.next()?; // the closing brace
                    return Ok(Item {
                        keys,
                        value: Value::Object(items),
                        line,
                    });
                }
                other if keys.is_empty() => {
                    return Err(err_at(
                        pos,
                        format!("expected: IDENT | STRING got: {other}"),
                    ));
                }
                other => {
                    return Err(err_at(
                        pos,
                        format!("expected: IDENT | STRING | ASSIGN | LBRACE got: {other}"),
                    ));
                }
            }
        }
    }

    fn value(&mut self) -> Result<Value, String> {
        let (tok, pos) = self.next()?;
        match tok {
            Tok::Str(s) | Tok::Heredoc(s) => Ok(Value::String(s)),
            Tok::Number(n) => Ok(Value::Number(n)),
            Tok::Bool(b) => Ok(Value::Bool(b)),
            Tok::LBrace => {
                let items = self.object_list(true)?;
                self.next()?;
                Ok(Value::Object(items))
            }
            Tok::LBrack => {
                let mut list = Vec::new();
                loop {
                    if self.peek()?.0 == Tok::RBrack {
                        self.next()?;
                        return Ok(Value::List(list));
                    }
                    list.push(self.value()?);
                    let (tok, pos) = self.next()?;
                    match tok {
                        Tok::Comma => {}
                        Tok::RBrack => return Ok(Value::List(list)),
                        other => {
                            return Err(err_at(
                                pos,
                                format!(
                                    "error parsing list, expected comma or list end, got: {other}"
                                ),
                            ));
                        }
                    }
                }
            }
            other => Err(err_at(pos, format!("Unknown token: {other}"))),
        }
    }
}

/// Parses an HCL 1 document (or a JSON one) into its top-level items.
pub(crate) fn parse(src: &str) -> Result<Vec<Item>, String> {
    if src.trim_start().starts_with('{') {
        let json: serde_json::Value =
            serde_json::from_str(src).map_err(|e| format!("invalid JSON: {e}"))?;
        return match json {
            serde_json::Value::Object(map) => Ok(json_items(&map)),
            _ => Err("does not contain a root object".into()),
        };
    }
    let mut parser = Parser {
        lexer: Lexer::new(src),
        peeked: None,
    };
    parser.object_list(false)
}

fn json_items(map: &serde_json::Map<String, serde_json::Value>) -> Vec<Item> {
    let mut items = Vec::new();
    for (k, v) in map {
        match v {
            // HCL flattens `"path": [{...}, {...}]` into one item per object.
            serde_json::Value::Array(list)
                if !list.is_empty() && list.iter().all(|e| e.is_object()) =>
            {
                for e in list {
                    items.push(Item {
                        keys: vec![k.clone()],
                        value: json_value(e),
                        line: 1,
                    });
                }
            }
            _ => items.push(Item {
                keys: vec![k.clone()],
                value: json_value(v),
                line: 1,
            }),
        }
    }
    items
}

fn json_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::String(String::new()),
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => Value::Number(n.to_string()),
        serde_json::Value::String(s) => Value::String(s.clone()),
        serde_json::Value::Array(a) => Value::List(a.iter().map(json_value).collect()),
        serde_json::Value::Object(m) => Value::Object(json_items(m)),
    }
}

// ---------------------------------------------------------------------------------------------
// Policies

/// Capability bits, as Vault numbers them.
pub(crate) mod caps {
    pub(crate) const DENY: u32 = 1;
    pub(crate) const CREATE: u32 = 1 << 1;
    pub(crate) const READ: u32 = 1 << 2;
    pub(crate) const UPDATE: u32 = 1 << 3;
    pub(crate) const DELETE: u32 = 1 << 4;
    pub(crate) const LIST: u32 = 1 << 5;
    pub(crate) const SUDO: u32 = 1 << 6;
    pub(crate) const PATCH: u32 = 1 << 7;
    pub(crate) const SUBSCRIBE: u32 = 1 << 8;

    /// Name → bit, in the order Vault prints capabilities.
    pub(crate) const NAMES: [(&str, u32); 9] = [
        ("sudo", SUDO),
        ("read", READ),
        ("list", LIST),
        ("update", UPDATE),
        ("delete", DELETE),
        ("create", CREATE),
        ("patch", PATCH),
        ("subscribe", SUBSCRIBE),
        ("deny", DENY),
    ];

    pub(crate) fn bit(name: &str) -> Option<u32> {
        NAMES.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
    }
}

/// One `path "..." { ... }` block of a parsed policy.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PathRule {
    /// The path with a leading `/` dropped and, for a plain prefix rule, the trailing `*` dropped
    /// (as Vault stores it); a rule with `+` segments keeps its trailing `*`.
    pub path: String,
    /// The pattern as written in the policy.
    pub pattern: String,
    pub capabilities: Vec<String>,
    pub bits: u32,
    /// Ends in `*` (glob).
    pub is_prefix: bool,
    /// Holds `+` segment wildcards.
    pub has_segment_wildcards: bool,
    /// Holds `{{identity...}}` templating (never matches in the double: tokens have no entity).
    pub templated: bool,
    /// Keys present in the block that the double parses but does not enforce.
    pub unenforced: Vec<String>,
}

/// A parsed ACL policy.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Policy {
    pub name: Option<String>,
    pub paths: Vec<PathRule>,
}

const PATH_KEYS: [&str; 11] = [
    "comment",
    "policy",
    "capabilities",
    "allowed_parameters",
    "denied_parameters",
    "required_parameters",
    "min_wrapping_ttl",
    "max_wrapping_ttl",
    "mfa_methods",
    "control_group",
    "subscribe_event_types",
];

/// Parses a policy as Vault does; the error is what Vault puts after `failed to parse policy: `.
pub(crate) fn parse_policy(text: &str) -> Result<Policy, String> {
    let items = parse(text)?;
    let mut policy = Policy {
        name: None,
        paths: Vec::new(),
    };
    for item in &items {
        let key = item.keys[0].as_str();
        match key {
            "name" => match &item.value {
                Value::String(s) => policy.name = Some(s.clone()),
                other => {
                    return Err(format!(
                        "name: expected a string, got a {} on line {}",
                        other.kind(),
                        item.line
                    ));
                }
            },
            "path" => {
                for (pattern, body, line) in path_blocks(item)? {
                    policy.paths.push(path_rule(&pattern, body, line)?);
                }
            }
            other => return Err(format!("invalid key {other:?} on line {}", item.line)),
        }
    }
    Ok(policy)
}

/// The `(pattern, body, line)` blocks one top-level `path` item stands for.
/// A path block: its pattern, its body and its line.
type PathBlock<'a> = (String, &'a [Item], usize);

fn path_blocks(item: &Item) -> Result<Vec<PathBlock<'_>>, String> {
    match (&item.keys[1..], &item.value) {
        ([pattern], Value::Object(body)) => Ok(vec![(pattern.clone(), body, item.line)]),
        ([], Value::Object(entries)) => entries
            .iter()
            .map(|entry| match (&entry.keys[..], &entry.value) {
                ([pattern], Value::Object(body)) => Ok((pattern.clone(), &body[..], entry.line)),
                _ => Err(format!(
                    "path: expected \"pattern\" = {{ ... }} on line {}",
                    entry.line
                )),
            })
            .collect(),
        _ => Err(format!(
            "path: expected a block path \"pattern\" {{ ... }} on line {}",
            item.line
        )),
    }
}

fn path_rule(pattern: &str, body: &[Item], line: usize) -> Result<PathRule, String> {
    let _ = line;
    let mut capabilities: Vec<String> = Vec::new();
    let mut old_policy: Option<String> = None;
    let mut unenforced = Vec::new();
    for entry in body {
        let key = entry.keys[0].as_str();
        if entry.keys.len() > 1 && key != "control_group" {
            return Err(format!(
                "path {pattern:?}: invalid key {key:?} on line {}",
                entry.line
            ));
        }
        if !PATH_KEYS.contains(&key) {
            return Err(format!(
                "path {pattern:?}: invalid key {key:?} on line {}",
                entry.line
            ));
        }
        match key {
            "capabilities" => match &entry.value {
                Value::List(list) => {
                    for v in list {
                        match v {
                            Value::String(s) => capabilities.push(s.clone()),
                            Value::Number(n) => capabilities.push(n.clone()),
                            other => {
                                return Err(format!(
                                    "path {pattern:?}: capabilities: expected strings, got a {} on line {}",
                                    other.kind(),
                                    entry.line
                                ));
                            }
                        }
                    }
                }
                other => {
                    return Err(format!(
                        "path {pattern:?}: capabilities: expected a list, got a {} on line {}",
                        other.kind(),
                        entry.line
                    ));
                }
            },
            "policy" => match &entry.value {
                Value::String(s) => old_policy = Some(s.clone()),
                other => {
                    return Err(format!(
                        "path {pattern:?}: policy: expected a string, got a {} on line {}",
                        other.kind(),
                        entry.line
                    ));
                }
            },
            "comment" => {}
            "min_wrapping_ttl" | "max_wrapping_ttl" => {
                let ok = match &entry.value {
                    Value::String(s) => util::parse_duration_str(s).is_ok(),
                    Value::Number(n) => n.parse::<f64>().is_ok(),
                    _ => false,
                };
                if !ok {
                    return Err(format!("error parsing {key}: invalid duration"));
                }
                unenforced.push(key.to_string());
            }
            _ => unenforced.push(key.to_string()),
        }
    }

    let mut path = pattern.strip_prefix('/').unwrap_or(pattern).to_string();
    if path.contains("+*") {
        return Err(format!(
            "path {path:?}: invalid use of wildcards ('+*' is forbidden)"
        ));
    }
    let has_segment_wildcards = path == "+" || path.contains("/+") || path.starts_with("+/");
    let mut is_prefix = false;
    if path.ends_with('*') {
        is_prefix = true;
        if !has_segment_wildcards {
            path.pop();
        }
    }

    if let Some(p) = &old_policy {
        match p.as_str() {
            "deny" => capabilities = vec!["deny".into()],
            "read" => capabilities.extend(["read", "list"].map(String::from)),
            "write" => capabilities
                .extend(["create", "read", "update", "delete", "list"].map(String::from)),
            "sudo" => capabilities
                .extend(["create", "read", "update", "delete", "list", "sudo"].map(String::from)),
            other => return Err(format!("path {pattern:?}: invalid policy {other:?}")),
        }
    }

    let mut bits = 0;
    for cap in &capabilities {
        match caps::bit(cap) {
            Some(caps::DENY) => {
                capabilities = vec!["deny".into()];
                bits = caps::DENY;
                break;
            }
            Some(bit) => bits |= bit,
            None => return Err(format!("path {pattern:?}: invalid capability {cap:?}")),
        }
    }

    Ok(PathRule {
        templated: path.contains("{{"),
        path,
        pattern: pattern.to_string(),
        capabilities,
        bits,
        is_prefix,
        has_segment_wildcards,
        unenforced,
    })
}
