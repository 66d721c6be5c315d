// Shown to a candidate whose terminal is recorded (the template's recording.notice).
export function RecordedNotice() {
  return (
    <p className="recorded-notice" role="note">
      This session is recorded
    </p>
  );
}
