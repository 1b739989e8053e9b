package proxy

import (
	"bytes"
	"reflect"
	"testing"

	"golang.org/x/net/http2/hpack"
)

// decodeBlocks decodes blocks in order with one x/net decoder, as a peer
// reads a connection.
func decodeBlocks(t *testing.T, blocks ...[]byte) [][]hpack.HeaderField {
	t.Helper()
	dec := hpack.NewDecoder(4096, nil)
	var out [][]hpack.HeaderField
	for _, b := range blocks {
		fields, err := dec.DecodeFull(b)
		if err != nil {
			t.Fatalf("x/net cannot decode % x: %v", b, err)
		}
		out = append(out, fields)
	}
	return out
}

// The static table is RFC 7541's: every index decodes, in x/net's
// decoder, to the entry the encoder takes it for.
func TestStaticTable(t *testing.T) {
	if len(staticTable) != 61 {
		t.Fatalf("%d static entries, RFC 7541 has 61", len(staticTable))
	}
	for i, e := range staticTable {
		got := decodeBlocks(t, appendHpackInt(nil, 0x80, 7, uint64(i+1)))[0]
		if len(got) != 1 || got[0].Name != e[0] || got[0].Value != e[1] {
			t.Fatalf("index %d is %v for x/net, %q here", i+1, got, e)
		}
	}
}

// Header blocks decode, with x/net's decoder, to the fields written:
// whole static entries as one byte, sensitive fields as never-indexed
// literals, long names and values with multi-byte lengths, and nothing
// left in the peer's dynamic table.
func TestHeaderBlockRoundTrip(t *testing.T) {
	long := string(bytes.Repeat([]byte("v"), 300))
	req := []hpack.HeaderField{
		{Name: ":method", Value: "POST"}, {Name: ":scheme", Value: "http"},
		{Name: ":path", Value: "/nitrosign.v1.SignerService/Sign"}, {Name: ":authority", Value: "localhost:8443"},
		{Name: "content-type", Value: "application/grpc"}, {Name: "te", Value: "trailers"},
		{Name: "x-long", Value: long}, {Name: long, Value: ""},
		{Name: "x-request-id", Value: "0123456789abcdef", Sensitive: true},
		{Name: "authorization", Value: "secret", Sensitive: true},
		{Name: ":method", Value: "POST", Sensitive: true},
	}
	resp := []hpack.HeaderField{{Name: ":status", Value: "200"}, {Name: "content-type", Value: "application/grpc"}}
	b1 := appendHeaderBlock([]byte{hpackStart}, req)
	b2 := appendHeaderBlock(nil, resp)
	got := decodeBlocks(t, b1, b2)
	if !reflect.DeepEqual(got[0], req) || !reflect.DeepEqual(got[1], resp) {
		t.Fatalf("decoded\n%v\n%v\nwant\n%v\n%v", got[0], got[1], req, resp)
	}
	if n := len(appendHeaderBlock(nil, resp[:1])); n != 1 {
		t.Fatalf(":status 200 takes %d bytes, want 1 (its static index)", n)
	}
	// A peer whose table is smaller than the default still decodes them:
	// the first block set its table to 0.
	dec := hpack.NewDecoder(4096, nil)
	dec.SetAllowedMaxDynamicTableSize(0)
	if _, err := dec.DecodeFull(b1); err != nil {
		t.Fatalf("a peer with no dynamic table: %v", err)
	}
}

// FuzzHeaderBlockRoundTrip: any fields come back whole from x/net's
// decoder.
//
//	go test -run='^$' -fuzz=FuzzHeaderBlockRoundTrip -fuzztime=30s ./host/proxy/
func FuzzHeaderBlockRoundTrip(f *testing.F) {
	f.Add(":path", "/a", "content-type", "application/grpc", false)
	f.Add("accept-encoding", "gzip, deflate", "x", string(bytes.Repeat([]byte{0xff}, 200)), true)
	f.Fuzz(func(t *testing.T, n1, v1, n2, v2 string, sensitive bool) {
		in := []hpack.HeaderField{{Name: n1, Value: v1}, {Name: n2, Value: v2, Sensitive: sensitive}}
		dec := hpack.NewDecoder(4096, nil)
		for range 2 {
			got, err := dec.DecodeFull(appendHeaderBlock(nil, in))
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, in) {
				t.Fatalf("decoded %q, want %q", got, in)
			}
		}
	})
}
