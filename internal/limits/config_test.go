package limits

import (
	"flag"
	"io"
	"strings"
	"testing"
	"time"
)

func sample() Config {
	return Config{
		MaxConnections: 100, MaxInFlight: 200, DefaultCallTimeout: 30 * time.Second,
		MaxConcurrentStreams: 100, MaxHeaderListSize: 32 << 10, MaxMetadataSize: 16 << 10, MaxRecvMsgSize: 1 << 20,
		HandshakeTimeout: 5 * time.Second, KeepaliveMinTime: 10 * time.Second, KeepaliveTime: time.Minute,
		KeepaliveTimeout: 20 * time.Second,
	}
}

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(*Config)
		want   []string // every message expected; none: valid
	}{
		{"sample", func(*Config) {}, nil},
		{"idle and age 0 mean never, any ping rate", func(c *Config) {
			c.MaxConnectionIdle, c.MaxConnectionAge, c.MaxConnectionAgeGrace, c.KeepaliveMinTime = 0, 0, 0, 0
		}, nil},
		{"zero value", func(c *Config) { *c = Config{} }, []string{
			"max connections 0: want 1 to 65536", "max in-flight calls 0", "max concurrent streams per connection 0",
			"max header list size 0", "max metadata size 0", "max receive message size 0",
			"default call timeout 0s: must be > 0", "handshake timeout 0s", "keepalive time 0s", "keepalive timeout 0s",
		}},
		{"out of range", func(c *Config) {
			c.MaxInFlight, c.MaxConnections, c.MaxRecvMsgSize = 1<<21, 1<<17, 65<<20
		}, []string{"max in-flight calls 2097152: want 1 to 1048576", "max connections 131072", "max receive message size 68157440"}},
		{"negative", func(c *Config) {
			c.MaxMetadataSize, c.KeepaliveMinTime, c.MaxConnectionAge, c.MaxConnectionAgeGrace = -1, -time.Second, -time.Second, -time.Second
		}, []string{"max metadata size -1", "keepalive min time -1s: must not be negative", "max connection age -1s", "max connection age grace -1s"}},
		{"metadata above the header list", func(c *Config) { c.MaxMetadataSize = 64 << 10 }, []string{
			"max metadata size 65536 exceeds the max header list size 32768",
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := sample()
			tt.mutate(&c)
			err := c.Validate()
			if len(tt.want) == 0 {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Validate = nil, want %q", tt.want)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Validate = %v\nwant it to report %q", err, w)
				}
			}
		})
	}
}

// RegisterFlags registers every field, with the config's values as the
// defaults, and parses each into its field.
func TestRegisterFlags(t *testing.T) {
	c := sample()
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	c.RegisterFlags(fs, "client connection")
	if err := fs.Parse(nil); err != nil || c != sample() {
		t.Fatalf("no flags changed the config: %+v, %v", c, err)
	}
	n := 0
	fs.VisitAll(func(f *flag.Flag) {
		n++
		if !strings.Contains(f.Usage, "(default") && f.DefValue == "" {
			t.Errorf("--%s has no default shown", f.Name)
		}
	})
	if n != 14 {
		t.Errorf("%d flags registered, want one per field (14)", n)
	}
	err := fs.Parse([]string{
		"--max-connections", "1", "--max-in-flight", "2", "--default-timeout", "3s", "--max-concurrent-streams", "4",
		"--max-header-list-size", "5000", "--max-metadata-size", "600", "--max-recv-msg-size", "7", "--handshake-timeout", "8s",
		"--keepalive-min-time", "9s", "--keepalive-time", "10s", "--keepalive-timeout", "11s", "--max-connection-idle", "12s",
		"--max-connection-age", "13s", "--max-connection-age-grace", "14s",
	})
	if err != nil {
		t.Fatal(err)
	}
	want := Config{1, 2, 3 * time.Second, 4, 5000, 600, 7, 8 * time.Second, 9 * time.Second, 10 * time.Second,
		11 * time.Second, 12 * time.Second, 13 * time.Second, 14 * time.Second}
	if c != want {
		t.Fatalf("flags not applied:\n got %+v\nwant %+v", c, want)
	}
	for _, bad := range [][]string{{"--max-concurrent-streams", "-1"}, {"--max-header-list-size", "4294967296"}} {
		if err := fs.Parse(bad); err == nil || !strings.Contains(err.Error(), "want a number 0-4294967295") {
			t.Errorf("%v: %v", bad, err)
		}
	}
}
