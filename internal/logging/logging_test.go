package logging

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

func TestValidate(t *testing.T) {
	for _, c := range []Config{{}, {Level: "debug", Format: "console"}, {Level: "error", Format: "json"}} {
		if err := c.Validate(); err != nil {
			t.Errorf("%+v: %v", c, err)
		}
	}
	for _, c := range []Config{{Level: "loud"}, {Format: "xml"}} {
		if err := c.Validate(); err == nil {
			t.Errorf("%+v: want error", c)
		}
	}
}

func TestJSONByDefault(t *testing.T) {
	var buf bytes.Buffer
	log, err := New(Config{}, &buf)
	if err != nil {
		t.Fatal(err)
	}
	log.Debug("hidden")
	log.Info("shown")
	_ = log.Sync()
	out := strings.TrimSpace(buf.String())
	if strings.Contains(out, "hidden") {
		t.Fatalf("debug line written at info level: %s", out)
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("not JSON: %q: %v", out, err)
	}
	if m["msg"] != "shown" || m["level"] != "info" {
		t.Fatalf("unexpected line %v", m)
	}
}
