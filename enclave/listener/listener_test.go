package listener

import (
	"strings"
	"testing"

	"go.uber.org/fx/fxtest"
	"go.uber.org/zap"
)

func TestValidate(t *testing.T) {
	tests := []struct {
		port uint32
		want string
	}{
		{0, "port 0"},
		{9000, "reserved by nitro-cli"},
		{0xFFFFFFFF, "not a fixed port"},
	}
	for _, tt := range tests {
		err := Config{CID: CIDAny, Port: tt.port}.Validate()
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("port %d: %v, want %q", tt.port, err, tt.want)
		}
	}
	if err := (Config{CID: CIDAny, Port: DefaultPort}).Validate(); err != nil {
		t.Fatal(err)
	}
}

// TestListenLoopbackHint: on a kernel without vsock_loopback, binding CID 1
// fails with an error that says what to do. Where loopback exists, the
// listener binds and closes cleanly with the app.
func TestListenLoopbackHint(t *testing.T) {
	lc := fxtest.NewLifecycle(t)
	l, err := New(Params{Config: Config{CID: 1, Port: 40123}, Logger: zap.NewNop(), Lifecycle: lc})
	if err != nil {
		if !strings.Contains(err.Error(), "vsock_loopback") {
			t.Fatalf("error without a hint: %v", err)
		}
		return
	}
	lc.RequireStart()
	if l.Addr().String() == "" {
		t.Fatal("no address")
	}
	lc.RequireStop()
	lc.RequireStop() // closing twice is not an error
}
