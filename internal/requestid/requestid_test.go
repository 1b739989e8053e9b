package requestid

import (
	"context"
	"strings"
	"testing"

	"google.golang.org/grpc/metadata"
)

func TestValid(t *testing.T) {
	tests := []struct {
		in   string
		want bool
	}{
		{"", false},
		{"abc", true},
		{"3f2c9a1e-7b4d-4c1a-9e8f-0123456789ab", true},
		{"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", true},
		{"svc:job_1.2", true},
		{strings.Repeat("a", MaxLen), true},
		{strings.Repeat("a", MaxLen+1), false},
		{"has space", false},
		{"new\nline", false},
		{`quote"`, false},
		{"ünïcode", false},
	}
	for _, tt := range tests {
		if got := Valid(tt.in); got != tt.want {
			t.Errorf("Valid(%q) = %v, want %v", tt.in, got, tt.want)
		}
	}
}

func TestEnsure(t *testing.T) {
	tests := []struct {
		name    string
		md      metadata.MD
		keep    string // the client's id that must survive, "" = a new one
		wantOne bool
	}{
		{"no metadata", nil, "", true},
		{"client id kept", metadata.Pairs(Key, "client-1"), "client-1", true},
		{"invalid client id replaced", metadata.Pairs(Key, "bad id\n"), "", true},
		{"two ids replaced", metadata.Pairs(Key, "a", Key, "b"), "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			if tt.md != nil {
				ctx = metadata.NewIncomingContext(ctx, tt.md)
			}
			ctx, id := Ensure(ctx)
			if tt.keep != "" && id != tt.keep {
				t.Fatalf("id %q, want the client's %q", id, tt.keep)
			}
			if !Valid(id) {
				t.Fatalf("id %q not valid", id)
			}
			md, _ := metadata.FromIncomingContext(ctx)
			if got := md.Get(Key); len(got) != 1 || got[0] != id {
				t.Fatalf("incoming metadata %q = %q, want [%q]", Key, got, id)
			}
			if FromContext(ctx) != id {
				t.Fatalf("FromContext = %q, want %q", FromContext(ctx), id)
			}
			if tt.md != nil && len(tt.md.Get(Key)) > 0 && tt.keep == "" && tt.md.Get(Key)[0] == id {
				t.Fatal("invalid client id kept")
			}
		})
	}
}

func TestNewUnique(t *testing.T) {
	seen := map[string]bool{}
	for range 1000 {
		id := New()
		if len(id) != 32 || !Valid(id) || seen[id] {
			t.Fatalf("New() = %q (len %d, seen %v)", id, len(id), seen[id])
		}
		seen[id] = true
	}
}

func TestFromContextEnclaveSide(t *testing.T) {
	ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs(Key, "from-proxy"))
	if got := FromContext(ctx); got != "from-proxy" {
		t.Fatalf("FromContext = %q", got)
	}
	bad := metadata.NewIncomingContext(context.Background(), metadata.Pairs(Key, "x y"))
	if got := FromContext(bad); got != "" {
		t.Fatalf("FromContext(invalid) = %q, want empty", got)
	}
	if f := Field(bad); f.Key != "" {
		t.Fatalf("Field(invalid) = %v, want skip", f)
	}
}
