package attest_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hf/nsm/request"
	"github.com/hf/nsm/response"
	"go.uber.org/zap/zaptest"

	"github.com/nitrosign/nitrosign/enclave/attest"
)

// The real /dev/nsm exists only inside a Nitro Enclave. These tests run the
// Device over a fake hf/nsm session; only nsm.OpenSession and the ioctl are
// left to the enclave (and to e2e on real hardware).

type fakeSession struct {
	send   func(request.Request) (response.Response, error)
	read   func([]byte) (int, error)
	closed int
}

func (s *fakeSession) Send(r request.Request) (response.Response, error) { return s.send(r) }
func (s *fakeSession) Read(p []byte) (int, error)                        { return s.read(p) }
func (s *fakeSession) Close() error                                      { s.closed++; return nil }

func TestDeviceAttestation(t *testing.T) {
	var got *request.Attestation
	ok := func(r request.Request) (response.Response, error) {
		got = r.(*request.Attestation)
		return response.Response{Attestation: &response.Attestation{Document: []byte("document")}}, nil
	}
	big := make([]byte, attest.MaxFieldSize+1)
	tests := []struct {
		name                       string
		send                       func(request.Request) (response.Response, error)
		nonce, userData, publicKey []byte
		want                       error
		wantText                   string
	}{
		{name: "fields passed through", send: ok, nonce: []byte("n"), userData: []byte("u"), publicKey: []byte("p")},
		{name: "empty fields sent as null", send: ok, nonce: []byte{}, userData: []byte{}},
		{name: "oversized nonce", send: ok, nonce: big, want: attest.ErrInvalidArgument, wantText: "nonce"},
		{name: "oversized public key", send: ok, publicKey: big, want: attest.ErrInvalidArgument, wantText: "public_key"},
		{name: "ioctl error", send: func(request.Request) (response.Response, error) {
			return response.Response{}, errors.New("ioctl failed on device with errno EIO")
		}, want: attest.ErrNSM, wantText: "errno EIO"},
		{name: "NSM error code", send: func(request.Request) (response.Response, error) {
			return response.Response{Error: response.ECInputTooLarge}, nil
		}, want: attest.ErrNSM, wantText: "InputTooLarge"},
		{name: "no document", send: func(request.Request) (response.Response, error) {
			return response.Response{Attestation: &response.Attestation{}}, nil
		}, want: attest.ErrNSM, wantText: "no document"},
		{name: "wrong response", send: func(request.Request) (response.Response, error) {
			return response.Response{GetRandom: &response.GetRandom{Random: []byte{1}}}, nil
		}, want: attest.ErrNSM},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got = nil
			sess := &fakeSession{send: tt.send}
			d := attest.NewDeviceWithSession(sess, "", zaptest.NewLogger(t))
			doc, err := d.Attestation(tt.nonce, tt.userData, tt.publicKey)
			if tt.want != nil {
				if !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.wantText) || doc != nil {
					t.Fatalf("Attestation = %q, %v; want %v mentioning %q", doc, err, tt.want, tt.wantText)
				}
				if errors.Is(tt.want, attest.ErrInvalidArgument) && got != nil {
					t.Error("an oversized request reached the NSM")
				}
				return
			}
			if err != nil || string(doc) != "document" {
				t.Fatalf("Attestation = %q, %v", doc, err)
			}
			for _, f := range []struct {
				name      string
				sent, arg []byte
			}{{"nonce", got.Nonce, tt.nonce}, {"user_data", got.UserData, tt.userData}, {"public_key", got.PublicKey, tt.publicKey}} {
				if len(f.arg) == 0 && f.sent != nil {
					t.Errorf("empty %s sent as %#v, want nil (CBOR null)", f.name, f.sent)
				}
				if !bytes.Equal(f.sent, f.arg) {
					t.Errorf("%s sent as %q, want %q", f.name, f.sent, f.arg)
				}
			}
		})
	}
}

func TestDeviceRandomSeedAndClose(t *testing.T) {
	entropy := filepath.Join(t.TempDir(), "random")
	if err := os.WriteFile(entropy, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	reads := 0
	sess := &fakeSession{read: func(p []byte) (int, error) {
		reads++
		for i := range p {
			p[i] = 0xa5
		}
		return len(p), nil
	}}
	d := attest.NewDeviceWithSession(sess, entropy, zaptest.NewLogger(t))

	p := make([]byte, 16)
	if err := d.Random(p); err != nil || p[0] != 0xa5 {
		t.Fatalf("Random: %v %x", err, p)
	}
	// A regular file stands in for /dev/random; the reseed ioctl fails on
	// it, which is tolerated.
	if err := d.SeedKernelEntropy(); err != nil {
		t.Fatalf("SeedKernelEntropy: %v", err)
	}
	written, err := os.ReadFile(entropy)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(written, bytes.Repeat([]byte{0xa5}, attest.SeedBytes)) {
		t.Errorf("wrote %d bytes to the pool, want %d NSM bytes", len(written), attest.SeedBytes)
	}

	if err := d.Close(); err != nil || sess.closed != 1 {
		t.Fatalf("Close: %v, session closed %d times", err, sess.closed)
	}
	if err := d.Close(); err != nil || sess.closed != 1 {
		t.Fatalf("second Close: %v, session closed %d times", err, sess.closed)
	}
	if _, err := d.Attestation(nil, nil, nil); !errors.Is(err, attest.ErrNSM) {
		t.Errorf("Attestation after Close: %v", err)
	}
	if err := d.Random(p); !errors.Is(err, attest.ErrNSM) {
		t.Errorf("Random after Close: %v", err)
	}
	if err := d.SeedKernelEntropy(); !errors.Is(err, attest.ErrNSM) {
		t.Errorf("SeedKernelEntropy after Close: %v", err)
	}
}

func TestDeviceSeedFailures(t *testing.T) {
	good := func(p []byte) (int, error) { return len(p), nil }
	tests := []struct {
		name    string
		read    func([]byte) (int, error)
		entropy string
		want    error
	}{
		{"NSM random fails", func([]byte) (int, error) { return 0, errors.New("GetRandom failed") }, filepath.Join(t.TempDir(), "r"), attest.ErrNSM},
		{"pool not writable", good, filepath.Join(t.TempDir(), "missing", "random"), os.ErrNotExist},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := attest.NewDeviceWithSession(&fakeSession{read: tt.read}, tt.entropy, zaptest.NewLogger(t))
			if err := d.SeedKernelEntropy(); !errors.Is(err, tt.want) {
				t.Fatalf("SeedKernelEntropy = %v, want %v", err, tt.want)
			}
		})
	}
}

func TestOpenDeviceMissing(t *testing.T) {
	_, err := attest.OpenDevice(filepath.Join(t.TempDir(), "nsm"), "/dev/random", zaptest.NewLogger(t))
	if !errors.Is(err, attest.ErrNSM) {
		t.Fatalf("OpenDevice = %v, want ErrNSM", err)
	}
}
