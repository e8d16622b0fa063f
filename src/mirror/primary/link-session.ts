// One pairing of a LUN with its peer, from the peer's OK to the link going down (or the session
// being dropped for a renegotiation). A catch-up worker holds the session it started in and stops
// once that ends: it never carries on into a later session, whose peer state it did not see.
export class LinkSession {
  private over = false;

  /** A session that has already ended (a worker started while no session is up). */
  static readonly NONE: LinkSession = LinkSession.ended();

  private static ended(): LinkSession {
    const s = new LinkSession();
    s.over = true;
    return s;
  }

  get live(): boolean {
    return !this.over;
  }

  end(): void {
    this.over = true;
  }
}
