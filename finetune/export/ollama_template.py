"""The Ollama Modelfile's Go TEMPLATE: Gemma 4's chat format, tools, calls and responses included.

Over Ollama's template data it renders what Google's chat template renders, thinking off (the
empty thought scaffold before each answer) or on (`.Think`: `<|think|>` in the system turn, the
message's `.Thinking` kept on the call steps of the current turn, as the official template keeps them).

Facts about Ollama's data it relies on (ollama/ollama template/template.go, api/types.go):
`.Messages` holds every message (system ones too; consecutive same-role non-tool messages are
merged), each with `.Role`, `.Content`, `.ToolCalls` (`.ID`, `.Function.Name`,
`.Function.Arguments`: a plain map), `.ToolName`, `.ToolCallID`; `.Tools` lists
`.Function.{Name,Description,Parameters}` whose `.Properties` is a plain map of ToolProperty
(`.Type` prints as its one type, `.Properties` a nested map reached through `.ToMap`). Go ranges
over maps in key order, as the official template's `dictsort` does. The only helper used beyond
Go's own is Ollama's `json`, to tell strings, maps, lists and numbers apart (Go templates have
no type tests) and to print numbers and booleans as JSON does.

A last assistant message is Ollama's prefill: it is rendered open (no `<turn|>`) and no
generation prompt follows. Not reproduced: the official template's `trim` of contents (Go
templates have no trim), media placeholders, `dictsort`'s case-blind order for keys
that differ only in case, and its "None" name for a tool response that names no call.
"""

from __future__ import annotations

# One `define` per macro of the official template; `{{ "{" }}` writes a brace next to an action.
_UPPER = ('{{- define "upper" }}{{ if eq . "string" }}STRING{{ else if eq . "integer" }}INTEGER'
          '{{ else if eq . "number" }}NUMBER{{ else if eq . "boolean" }}BOOLEAN{{ else if eq . "array" }}ARRAY'
          '{{ else if eq . "object" }}OBJECT{{ else if eq . "null" }}NULL{{ else }}{{ . }}{{ end }}{{ end }}')

# A value of call arguments (or an enum/required list): strings in <|"|>, maps as {key:value}.
_ARG = """{{- define "arg" }}{{ $j := json . }}{{ $c := slice $j 0 1 }}
{{- if eq $c `"` }}<|"|>{{ . }}<|"|>
{{- else if eq $c "{" }}{{ "{" }}{{ $sep := "" }}{{ range $k, $v := . }}{{ $sep }}{{ $k }}:{{ template "arg" $v }}{{ $sep = "," }}{{ end }}}
{{- else if eq $c "[" }}[{{ range $i, $v := . }}{{ if $i }},{{ end }}{{ template "arg" $v }}{{ end }}]
{{- else if eq $j "null" }}None
{{- else }}{{ $j }}{{ end }}{{ end }}"""

# The properties of a tool's parameters (a map of ToolProperty), as the official template's
# format_parameters writes them; the schema's own keywords as property names are skipped there too.
_PROPS = """{{- define "props" }}{{ $sep := "" }}{{ range $k, $v := . }}
{{- if not (or (eq $k "description") (eq $k "type") (eq $k "properties") (eq $k "required") (eq $k "nullable")) }}
{{- $sep }}{{ $sep = "," }}{{ $k }}:{{ "{" }}{{ $comma := "" }}{{ $t := print $v.Type }}
{{- if $v.Description }}description:<|"|>{{ $v.Description }}<|"|>{{ $comma = "," }}{{ end }}
{{- if eq $t "string" }}{{ if $v.Enum }}{{ $comma }}enum:{{ template "arg" $v.Enum }}{{ $comma = "," }}{{ end }}
{{- else if eq $t "array" }}{{ if $v.Items }}{{ $comma }}items:{{ "{" }}{{ $s := "" }}{{ range $ik, $iv := $v.Items }}
{{- if ne (json $iv) "null" }}{{ $s }}{{ $s = "," }}
{{- if eq $ik "type" }}type:{{ if eq (slice (json $iv) 0 1) "[" }}[{{ range $n, $x := $iv }}{{ if $n }},{{ end }}<|"|>{{ template "upper" $x }}<|"|>{{ end }}]{{ else }}<|"|>{{ template "upper" $iv }}<|"|>{{ end }}
{{- else }}{{ $ik }}:{{ template "arg" $iv }}{{ end }}{{ end }}{{ end }}}{{ $comma = "," }}{{ end }}{{ end }}
{{- if eq $t "object" }}{{ $comma }}properties:{{ "{" }}{{ if $v.Properties }}{{ template "props" $v.Properties.ToMap }}{{ end }}}{{ $comma = "," }}
{{- if $v.Required }},required:{{ template "arg" $v.Required }}{{ end }}{{ end }}
{{- $comma }}type:<|"|>{{ template "upper" $t }}<|"|>}{{ end }}{{ end }}{{ end }}"""

# One tool: declaration:NAME{description:…,parameters:{properties:{…},required:[…],type:…}}.
_DECL = """{{- define "decl" }}declaration:{{ .Function.Name }}{{ "{" }}description:<|"|>{{ .Function.Description }}<|"|>
{{- with .Function.Parameters }},parameters:{{ "{" }}
{{- if .Properties }}properties:{{ "{" }}{{ template "props" .Properties }}},{{ end }}
{{- if .Required }}required:{{ template "arg" .Required }},{{ end }}
{{- if .Type }}type:<|"|>{{ template "upper" .Type }}<|"|>}{{ end }}{{ end }}}{{ end }}"""

# The system turn (`<|think|>` when thinking is on, the first message if it is a system one, the
# tools), then each turn (a thought kept only on a call step after the last user message):
# an assistant after tool responses continues the same model turn; calls are answered inside it
# by the `tool` messages that follow. `$prev` is the official template's prev_message_type.
_BODY = """
{{- $skip := -1 }}{{ if .Messages }}{{ if eq (index .Messages 0).Role "system" }}{{ $skip = 0 }}{{ end }}{{ end }}
{{- if or .Think .Tools (eq $skip 0) }}<|turn>system
{{ if .Think }}<|think|>
{{ end }}{{ if eq $skip 0 }}{{ (index .Messages 0).Content }}{{ end }}
{{- range .Tools }}<|tool>{{ template "decl" . }}<tool|>{{ end }}<turn|>
{{ end }}
{{- $prev := "" }}{{ $prevRole := "" }}{{ $lastRole := "" }}{{ $lastUser := -1 }}
{{- range $i, $m := .Messages }}{{ if eq $m.Role "user" }}{{ $lastUser = $i }}{{ end }}{{ end }}
{{- range $i, $m := .Messages }}{{ $lastRole = $m.Role }}
{{- if and (ne $i $skip) (ne $m.Role "tool") }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- $role := $m.Role }}{{ if eq $role "assistant" }}{{ $role = "model" }}{{ end }}
{{- if not (and (eq $role "model") (eq $prevRole "assistant")) }}<|turn>{{ $role }}
{{ end }}
{{- $prevRole = $m.Role }}{{ $prev = "" }}{{ $out := false }}
{{- if and $m.Thinking (gt $i $lastUser) $m.ToolCalls }}<|channel>thought
{{ $m.Thinking }}
<channel|>{{ end }}
{{- range $m.ToolCalls }}<|tool_call>call:{{ .Function.Name }}{{ "{" }}{{ $sep := "" }}
{{- range $k, $v := .Function.Arguments }}{{ $sep }}{{ $k }}:{{ template "arg" $v }}{{ $sep = "," }}{{ end }}}<tool_call|>
{{- $prev = "tool_call" }}{{ end }}
{{- if $m.ToolCalls }}{{ $stop := false }}{{ range $j, $f := $.Messages }}{{ if and (gt $j $i) (not $stop) }}
{{- if ne $f.Role "tool" }}{{ $stop = true }}{{ else }}
{{- $name := $f.ToolName }}{{ if not $name }}{{ $name = "unknown" }}{{ end }}
{{- range $m.ToolCalls }}{{ if eq .ID $f.ToolCallID }}{{ $name = .Function.Name }}{{ end }}{{ end -}}
<|tool_response>response:{{ $name }}{value:<|"|>{{ $f.Content }}<|"|>}<tool_response|>
{{- $out = true }}{{ $prev = "tool_response" }}{{ end }}{{ end }}{{ end }}{{ end }}
{{- $m.Content }}
{{- if and (eq $prev "tool_call") (not $out) }}<|tool_response>
{{- else if not (and $out (not $m.Content)) }}{{ if not (and $last (eq $m.Role "assistant")) }}<turn|>
{{ end }}{{ end }}
{{- end }}{{ end }}
{{- if and (ne $prev "tool_response") (ne $prev "tool_call") (ne $lastRole "assistant") }}<|turn>model
{{ if not .Think }}<|channel>thought
<channel|>{{ end }}{{ end }}"""

TEMPLATE = "\n".join((_UPPER, _ARG, _PROPS, _DECL, _BODY))
