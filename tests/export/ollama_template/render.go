// Renders a Modelfile TEMPLATE with Go's text/template over data shaped as Ollama's: the test
// tier `ollama_template` (tests/test_ollama_template.py) feeds it conversations as JSON on stdin
// ({"template": ..., "messages": [...], "tools": [...]}, Ollama's /api/chat shapes) and compares
// what it prints with Google's chat template. Standard library only.
//
// Mirrored from ollama/ollama (facts, not code):
//   - api/types.go: Message, ToolCall, Tool, ToolProperty, PropertyType (one type prints as
//     itself), ToolPropertiesMap (an ordered map exposing ToMap to templates).
//   - template/template.go: the `json` template func; Parse's missingkey=zero option; collate
//     (consecutive same-role messages merged with "\n\n" except tool ones, system contents
//     joined into .System); the data map of Execute for templates that use .Messages; the
//     template-facing types whose Arguments and Properties are plain maps.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type PropertyType []string

func (pt *PropertyType) UnmarshalJSON(data []byte) error {
	var s string
	if err := json.Unmarshal(data, &s); err == nil {
		*pt = []string{s}
		return nil
	}
	var a []string
	if err := json.Unmarshal(data, &a); err != nil {
		return err
	}
	*pt = a
	return nil
}

func (pt PropertyType) MarshalJSON() ([]byte, error) {
	if len(pt) == 1 {
		return json.Marshal(pt[0])
	}
	return json.Marshal([]string(pt))
}

func (pt PropertyType) String() string {
	if len(pt) == 0 {
		return ""
	}
	if len(pt) == 1 {
		return pt[0]
	}
	return fmt.Sprintf("%v", []string(pt))
}

type ToolPropertiesMap struct{ m map[string]ToolProperty }

func (t *ToolPropertiesMap) UnmarshalJSON(data []byte) error { return json.Unmarshal(data, &t.m) }
func (t ToolPropertiesMap) MarshalJSON() ([]byte, error)     { return json.Marshal(t.m) }
func (t *ToolPropertiesMap) ToMap() map[string]ToolProperty {
	if t == nil {
		return nil
	}
	return t.m
}

type ToolProperty struct {
	AnyOf       []ToolProperty     `json:"anyOf,omitempty"`
	Type        PropertyType       `json:"type,omitempty"`
	Items       any                `json:"items,omitempty"`
	Description string             `json:"description,omitempty"`
	Enum        []any              `json:"enum,omitempty"`
	Properties  *ToolPropertiesMap `json:"properties,omitempty"`
	Required    []string           `json:"required,omitempty"`
}

type templateTool struct {
	Type     string `json:"type"`
	Function struct {
		Name        string `json:"name"`
		Description string `json:"description"`
		Parameters  struct {
			Type       string                  `json:"type"`
			Required   []string                `json:"required,omitempty"`
			Properties map[string]ToolProperty `json:"properties"`
		} `json:"parameters"`
	} `json:"function"`
}

type templateToolCall struct {
	ID       string `json:"id"`
	Function struct {
		Index     int            `json:"index"`
		Name      string         `json:"name"`
		Arguments map[string]any `json:"arguments"`
	} `json:"function"`
}

type templateMessage struct {
	Role       string             `json:"role"`
	Content    string             `json:"content"`
	Thinking   string             `json:"thinking"`
	ToolCalls  []templateToolCall `json:"tool_calls"`
	ToolName   string             `json:"tool_name"`
	ToolCallID string             `json:"tool_call_id"`
}

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
}

func collate(msgs []templateMessage) (string, []*templateMessage) {
	var system []string
	var out []*templateMessage
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			out[len(out)-1].Content += "\n\n" + msgs[i].Content
		} else {
			out = append(out, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), out
}

func main() {
	var in struct {
		Template string            `json:"template"`
		Messages []templateMessage `json:"messages"`
		Tools    []templateTool    `json:"tools"`
		Think    bool              `json:"think"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, "input:", err)
		os.Exit(1)
	}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(in.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "parse:", err)
		os.Exit(1)
	}
	system, messages := collate(in.Messages)
	data := map[string]any{"System": system, "Messages": messages, "Tools": in.Tools, "Response": "",
		"Think": in.Think, "ThinkLevel": "", "IsThinkSet": in.Think}
	if in.Tools == nil {
		data["Tools"] = []templateTool(nil)
	}
	if err := tmpl.Execute(os.Stdout, data); err != nil {
		fmt.Fprintln(os.Stderr, "execute:", err)
		os.Exit(1)
	}
}
