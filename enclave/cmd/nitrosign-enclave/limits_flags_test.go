package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/nitrosign/nitrosign/enclave/server"
	"github.com/nitrosign/nitrosign/internal/limits"
)

func TestLimitFlags(t *testing.T) {
	c, err := parseFlags(nil, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	s := c.Server.Limits
	if s.MaxInFlight != server.DefaultMaxInFlight || s.MaxConcurrentStreams != server.DefaultMaxConcurrentStreams ||
		s.MaxConnectionAge != 0 || s.MaxConnectionIdle != 0 || s.KeepaliveMinTime != server.DefaultKeepaliveMinTime {
		t.Fatalf("limit defaults: %+v", s)
	}
	c, err = parseFlags([]string{
		"--max-in-flight", "7", "--default-timeout", "3s", "--max-connections", "9", "--max-concurrent-streams", "11",
		"--max-header-list-size", "20000", "--max-metadata-size", "10000", "--handshake-timeout", "2s",
		"--keepalive-min-time", "30s", "--keepalive-time", "1m", "--keepalive-timeout", "4s",
		"--max-connection-idle", "1h", "--max-connection-age", "2h", "--max-connection-age-grace", "5m",
	}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	s = c.Server.Limits
	want := limits.Config{MaxRecvMsgSize: s.MaxRecvMsgSize,
		HandshakeTimeout: 2 * time.Second, MaxInFlight: 7, DefaultCallTimeout: 3 * time.Second, MaxConnections: 9,
		MaxConcurrentStreams: 11, MaxHeaderListSize: 20000, MaxMetadataSize: 10000, KeepaliveMinTime: 30 * time.Second,
		KeepaliveTime: time.Minute, KeepaliveTimeout: 4 * time.Second, MaxConnectionIdle: time.Hour,
		MaxConnectionAge: 2 * time.Hour, MaxConnectionAgeGrace: 5 * time.Minute}
	if s != want {
		t.Fatalf("flags not applied:\n got %+v\nwant %+v", s, want)
	}
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"--max-in-flight", "-1"}, "max in-flight calls -1"},
		{[]string{"--max-concurrent-streams", "0"}, "max concurrent streams per connection 0"},
		{[]string{"--max-header-list-size", "4294967296"}, "want a number 0-4294967295"},
		{[]string{"--max-metadata-size", "100000"}, "exceeds the max header list size"},
		{[]string{"--keepalive-time", "-1s"}, "keepalive time -1s: must not be negative"},
	} {
		var stderr bytes.Buffer
		if _, err := parseFlags(tt.args, &stderr); err == nil || !strings.Contains(stderr.String(), tt.want) {
			t.Errorf("%v: err %v, stderr %q; want %q", tt.args, err, stderr.String(), tt.want)
		}
	}
}
