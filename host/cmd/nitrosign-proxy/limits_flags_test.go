package main

import (
	"bytes"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/nitrosign/nitrosign/host/proxy"
	"github.com/nitrosign/nitrosign/internal/limits"
)

func TestLimitFlags(t *testing.T) {
	def := proxy.DefaultConfig()
	c, err := parseFlags(nil, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if c.Limits.MaxConnections != def.Limits.MaxConnections || c.Limits.MaxInFlight != def.Limits.MaxInFlight || c.Limits.MaxConcurrentStreams != def.Limits.MaxConcurrentStreams ||
		c.Limits.MaxHeaderListSize != def.Limits.MaxHeaderListSize || c.Limits.MaxConnectionAge != def.Limits.MaxConnectionAge {
		t.Fatalf("limit defaults not the package's: %+v", c)
	}
	c, err = parseFlags([]string{
		"--max-connections", "10", "--max-in-flight", "20", "--default-timeout", "5s",
		"--max-concurrent-streams", "30", "--max-header-list-size", "40000", "--max-metadata-size", "20000",
		"--max-recv-msg-size", "1000", "--max-send-msg-size", "2000", "--handshake-timeout", "2s",
		"--keepalive-min-time", "20s", "--keepalive-time", "1m", "--keepalive-timeout", "5s",
		"--max-connection-idle", "0", "--max-connection-age", "2h", "--max-connection-age-grace", "1m",
		"--default-stream-timeout", "10m", "--max-connection-calls", "50", "--max-client-resets", "70",
		"--max-connection-buffer", "131072", "--memory-budget", "1048576",
	}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	want := def
	want.Limits = limits.Config{MaxConnections: 10, MaxInFlight: 20, DefaultCallTimeout: 5 * time.Second, MaxConcurrentStreams: 30,
		MaxHeaderListSize: 40000, MaxMetadataSize: 20000, MaxRecvMsgSize: 1000, HandshakeTimeout: 2 * time.Second,
		KeepaliveMinTime: 20 * time.Second, KeepaliveTime: time.Minute, KeepaliveTimeout: 5 * time.Second,
		MaxConnectionIdle: 0, MaxConnectionAge: 2 * time.Hour, MaxConnectionAgeGrace: time.Minute}
	want.MaxSendMsgSize, want.DefaultStreamTimeout, want.MaxConnectionCalls, want.MaxClientResets = 2000, 10*time.Minute, 50, 70
	want.MaxConnectionBuffer, want.MemoryBudget = 131072, 1<<20
	got := c
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("flags not applied:\n got %+v\nwant %+v", got, want)
	}
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"--max-connections", "0"}, "max connections 0"},
		{[]string{"--max-in-flight", "-5"}, "max in-flight calls -5"},
		{[]string{"--max-concurrent-streams", "lots"}, "want a number 0-4294967295"},
		{[]string{"--max-concurrent-streams", "4294967296"}, "want a number 0-4294967295"},
		{[]string{"--max-metadata-size", "100000"}, "exceeds the max header list size"},
		{[]string{"--default-timeout", "0s"}, "default call timeout 0s"},
	} {
		var stderr bytes.Buffer
		if _, err := parseFlags(tt.args, &stderr); err == nil || !strings.Contains(stderr.String(), tt.want) {
			t.Errorf("%v: err %v, stderr %q; want %q", tt.args, err, stderr.String(), tt.want)
		}
	}
}
